"""
Evaluation: the paper's three measurements, cheap to rerun and safe to interrupt.

    python evaluate.py generate --model out/cpo --task dolly --out out/cpo/greedy.jsonl      # continuations
    python evaluate.py interpolate --mle out/mle --cpo out/cpo --alphas 0,0.3,0.9,1 --out out/ens
    OPENAI_API_KEY=... python evaluate.py judge --generations out/cpo/greedy.jsonl --task dolly \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-3.5-turbo --out out/cpo/greedy.judge.jsonl
    OPENAI_API_KEY=... python evaluate.py dpo-negatives --task dolly --tokenizer gpt2-xl-folder --max-len 1024 \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-3.5-turbo --out out/dpo_negatives.jsonl
    python evaluate.py mauve --p p.npy --q q.npy
    python evaluate.py mauve --p-text gens.jsonl --q-text gens.jsonl --featurizer gpt2-large   # from text
    python evaluate.py report out/

The judge's client and rules live in judge.py, MAUVE in mauve.py (each usable on its own); this file reads
and writes the files around them. The experiment of every method on a CPU is miniature.py.

Files
- generations (generate's output), jsonl, one line per prompt:
  {"id", "prompt", "reference", "generation", "config"}; config holds the model folder, the task and the
  decoding flags (and "alpha" when the model came from `interpolate`).
- judge cache, jsonl, append-only (judge.py's format). Defaults to judge_cache.jsonl next to --out, shared
  by every judge run there.
- judgements (judge --out), jsonl, one line per pair: {"id", "verdict" (win|loss|tie|invalid),
  "reply_model_as_a", "reply_model_as_b"}; the summary goes to stdout and to <out>.summary.json.
- DPO negatives (dpo-negatives --out), jsonl: {"id", "rejected"}: the example's id (data.py's, e.g.
  "dolly-123", when read with --task; the file's with --examples, a jsonl of {"id", "prompt", "response"})
  and the judge model's unhelpful response, stripped; empty replies are left out. This is the file
  train.py's `dpo` objective reads (its dpo_rejected setting).
- MAUVE results (mauve --out), JSON: {"mauve", "n_p", "n_q", "p", "q"}; report reads *.mauve.json.
  Features come from a model folder (the reference uses gpt2-large): the final-layer hidden state at each
  text's last token.
- interpolated models: OUT/alpha_<alpha>/, an HF folder (config and tokenizer copied from the MLE model)
  plus interpolation.json {"alpha", "mle", "cpo", "method"}, which generate copies into its config.
- report: RUN_DIR/report.md, and RUN_DIR/win_rate_vs_alpha.svg when there are interpolated models.
"""
import argparse
import glob
import json
import os
import random
import shutil
import sys
import time
from xml.sax.saxutils import escape

import numpy as np
import torch

import data
import hf
import judge
import mauve
import tokenizer
from common import (cut_at_eos, end_torn_line, log, number, read_jsonl, refuse_same_paths, text_field,
                    write_atomic, write_folder_atomic, write_jsonl_atomic)
from model import left_pad

GREEDY = dict(temperature=0.0, top_k=None, top_p=None, num_beams=1, length_penalty=1.0)


# ----------------------------------------------------------------------------- generation
def decoding_label(d):
    """A short name for a decoding config, for file names and the report."""
    if d["num_beams"] > 1:
        return f"beam{d['num_beams']}"
    if d["temperature"] == 0:
        return "greedy"
    filters = [f"top-k{d['top_k']}" if d["top_k"] else "", f"top-p{d['top_p']:g}" if d["top_p"] else ""]
    return f"{'-'.join(f for f in filters if f) or 'sample'}-T{d['temperature']:g}"


def generate_batch(net, tok, prompts, max_new_tokens, decoding, generator=None):
    """Prompts (lists of ids, BOS included as data.py makes them) -> the new ids of each, as generated
    (EOS and the padding after it included). Left-padded into one (B, T) batch with its attention mask;
    a prompt that would not leave room for max_new_tokens within the model's context is cut from the
    left, keeping its BOS, as data.py cuts prompts."""
    room = net.config.max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"{net.config.max_seq_len} positions")
    bos = tok.bos_id is not None
    prompts = [data.cut_prompt_left(p, room, keep_bos=bos) for p in prompts]
    idx, mask = left_pad(prompts, tok.pad_id)  # (B, T) each
    device = net.tok_emb.weight.device
    out = net.generate(idx.to(device), max_new_tokens, attention_mask=mask.to(device), eos_id=tok.eos_id,
                       pad_id=tok.pad_id, generator=generator, **decoding)  # (B, max_new_tokens)
    return out.tolist()


def greedy_continuations(net, tok, examples, max_new_tokens, batch_size=32):
    """Greedy new ids for each example's prompt, batch_size prompts per generate call."""
    gens = []
    for s in range(0, len(examples), batch_size):
        gens += generate_batch(net, tok, [e.prompt_ids for e in examples[s:s + batch_size]], max_new_tokens, GREEDY)
    return gens


def new_text(tok, ids):
    """Decoded new tokens up to, not including, the first EOS."""
    ids = cut_at_eos(ids, tok.eos_id)
    return tok.decode(ids[:-1] if tok.eos_id in ids else ids)


def task_scores(model, tok, examples, task, batch_size=32, max_new_tokens=None):
    """Greedy continuations of held-out examples -> {metric: value}, for train.py's summary table.
    synthetic: data.score_synthetic's exact metrics; other tasks: the share that stopped and their
    mean length in new tokens (quality there needs the judge or MAUVE)."""
    if max_new_tokens is None:
        max_new_tokens = data.synthetic_max_new_tokens(task) if task.startswith("synthetic") else 256
    gens = greedy_continuations(model, tok, examples, max_new_tokens, batch_size)
    if task.startswith("synthetic"):
        return data.score_synthetic(gens, [e.continuation_ids for e in examples], tok.eos_id)
    lengths = [len(cut_at_eos(g, tok.eos_id)) for g in gens]
    return {"stopped": sum(tok.eos_id in g for g in gens) / len(gens), "mean_new_tokens": sum(lengths) / len(lengths)}


def generate(args):
    """Continuations of N test prompts (a seeded choice, the same for every model) -> jsonl, resumable."""
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    net, tok = hf.load(args.model, device=args.device, dtype=dtype)
    examples = data.load_task(args.task, args.split, tok, hf.window_len(args.model, net, args.max_len))
    if args.n and args.n < len(examples):
        examples = random.Random(args.seed).sample(examples, args.n)
    written = {r["id"] for r in read_jsonl(args.out, skip_torn_last_line=True)} if os.path.exists(args.out) else set()
    todo = sorted((e for e in examples if e.id not in written), key=lambda e: len(e.prompt_ids))  # less padding
    decoding = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                    length_penalty=args.length_penalty)
    config = dict(model=os.path.abspath(args.model), task=args.task, split=args.split, n=len(examples),
                  seed=args.seed, max_new_tokens=args.max_new_tokens, decoding=decoding_label(decoding), **decoding)
    info = os.path.join(args.model, "interpolation.json")  # a weight-space ensemble: carry its alpha
    if os.path.isfile(info):
        with open(info) as f:
            config.update(json.load(f))
    log(f"generate: {len(examples)} prompts, {len(examples) - len(todo)} already in {args.out}, {len(todo)} to go")
    if not todo:
        return
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    wiki = args.task.startswith("wiki")  # a Wiki reference is cut to what a generation may produce (MAUVE, judge)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with open(args.out, "a") as f:
        end_torn_line(f, args.out)
        for s in range(0, len(todo), args.batch_size):
            batch = todo[s:s + args.batch_size]
            gens = generate_batch(net, tok, [e.prompt_ids for e in batch], args.max_new_tokens, decoding, generator)
            for e, ids in zip(batch, gens):
                reference = new_text(tok, e.continuation_ids[:args.max_new_tokens]) if wiki else e.response
                f.write(json.dumps({"id": e.id, "prompt": e.prompt, "reference": reference,
                                    "generation": new_text(tok, ids), "config": config}) + "\n")
            f.flush()  # a crash loses at most this batch
            done = s + len(batch)
            log(f"generate: {done}/{len(todo)}, {(time.time() - t0) / done:.2f}s per prompt, "
                f"ETA {(time.time() - t0) / done * (len(todo) - done):.0f}s")


# ----------------------------------------------------------------------------- weight-space ensemble
def safetensors_files(folder):
    """{tensor name: file} of an HF folder's weights: model.safetensors, or shards and their index."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return dict.fromkeys(hf.read_safetensors(single), single)  # reads the header only (memory map)
    raise ValueError(f"{folder}: no model.safetensors (interpolate reads the safetensors folders that "
                     "save_pretrained writes)")


def check_same_architecture(mle_dir, cpo_dir):
    """Refuse to average two models that are not the same network: config, names, shapes and dtypes."""
    configs = []
    for d in (mle_dir, cpo_dir):
        with open(os.path.join(d, "config.json")) as f:
            configs.append(hf.config_from_hf(json.load(f)))
    diff = [f"{k}: {v} vs {getattr(configs[1], k)}" for k, v in vars(configs[0]).items() if getattr(configs[1], k) != v]
    if diff:
        raise ValueError(f"{mle_dir} and {cpo_dir} are different architectures ({'; '.join(diff)})")
    mle, cpo = safetensors_files(mle_dir), safetensors_files(cpo_dir)
    if set(mle) != set(cpo):
        only = sorted(set(mle) ^ set(cpo))
        raise ValueError(f"{mle_dir} and {cpo_dir} hold different tensors, e.g. {only[:3]}")
    a, b = {}, {}
    for files, into in ((mle, a), (cpo, b)):
        for path in set(files.values()):
            into.update(hf.read_safetensors(path))  # memory maps: no weights read yet
    for name in mle:
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            raise ValueError(f"tensor {name!r}: {tuple(a[name].shape)} {a[name].dtype} in {mle_dir} but "
                             f"{tuple(b[name].shape)} {b[name].dtype} in {cpo_dir}")
    return mle, cpo


def mix(a, b, alpha):
    """alpha * a + (1 - alpha) * b, computed in float32 (float64 stays float64), stored as a's dtype.
    The endpoints return the tensors themselves, so alpha = 1 and 0 reproduce them bit for bit."""
    if alpha == 1 or not a.is_floating_point():  # integer buffers: the architectures match, so do they
        return a
    if alpha == 0:
        return b
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (alpha * a.to(wide) + (1 - alpha) * b.to(wide)).to(a.dtype)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def interpolate_folder(mle_dir, cpo_dir, alpha, out_dir, files=None):
    """theta = alpha * theta_MLE + (1 - alpha) * theta_CPO into out_dir, an HF folder (config and tokenizer
    copied from mle_dir). Shard by shard of mle_dir's layout: the inputs are memory-mapped, so the peak
    memory is one output shard. Written beside out_dir and renamed into place."""
    mle, cpo = files or check_same_architecture(mle_dir, cpo_dir)

    def fill(tmp):
        for name in os.listdir(mle_dir):  # config.json, tokenizer files, generation_config.json, our index
            src = os.path.join(mle_dir, name)
            weights = name.endswith(WEIGHT_SUFFIXES) and name != "model.safetensors.index.json"
            if os.path.isfile(src) and not weights:  # never another copy of theta_MLE, in any format
                shutil.copy(src, tmp)
        for path in sorted(set(mle.values())):
            a, b = hf.read_safetensors(path), {}
            for p in {cpo[k] for k in a}:
                b.update(hf.read_safetensors(p))
            hf.write_safetensors(os.path.join(tmp, os.path.basename(path)), {k: mix(a[k], b[k], alpha) for k in a},
                                 {"format": "pt"})
        with open(os.path.join(tmp, "interpolation.json"), "w") as f:
            json.dump({"alpha": alpha, "mle": os.path.abspath(mle_dir), "cpo": os.path.abspath(cpo_dir),
                       "method": run_name(cpo_dir)}, f)
    return write_folder_atomic(out_dir, fill)


def alpha_folder(alpha):
    return f"alpha_{alpha:g}"


def parse_alphas(text):
    """"0,0.3,1" -> [0.0, 0.3, 1.0]; ValueError for an entry that is not a number in [0, 1], or that repeats
    another's folder name (6 significant digits): the second would overwrite the first."""
    alphas = {}  # folder name: alpha
    for item in text.split(","):
        try:
            alpha = float(item)
        except ValueError:
            raise ValueError(f"--alphas {text!r}: {item.strip()!r} is not a number") from None
        if not 0 <= alpha <= 1 or alpha_folder(alpha) in alphas:  # NaN fails the range test too
            raise ValueError(f"--alphas {text!r}: {item.strip()} is outside [0, 1], or another alpha there is also "
                             f"written to {alpha_folder(alpha)}/ (give each once, differing within 6 digits)")
        alphas[alpha_folder(alpha)] = alpha
    return list(alphas.values())


def interpolate(args):
    try:
        alphas = parse_alphas(args.alphas)
        files = check_same_architecture(args.mle, args.cpo)
    except ValueError as e:
        sys.exit(f"interpolate: {e}")
    for alpha in alphas:
        out = interpolate_folder(args.mle, args.cpo, alpha, os.path.join(args.out, alpha_folder(alpha)), files)
        log(f"interpolate: alpha {alpha:g} -> {out}")


# ----------------------------------------------------------------------------- judge (judge.py does the asking)
def cache_path(args):
    return args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")


def client_settings(args):
    """judge.ask_all's keyword arguments from the command line; the key from the environment only."""
    return dict(cache_path=cache_path(args), url=args.judge_url, model=args.judge_model,
                api_key=judge.api_key_from_env(args.api_key_env), workers=args.workers, max_tokens=args.max_tokens,
                temperature=args.temperature, timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff)


def judge_cmd(args):
    """Win rate against the references, both orders, cached; the judge sees data.judge_query of each prompt."""
    refuse_same_paths(**{"--generations": args.generations, "--out": args.out, "--cache": cache_path(args),
                         "--out's summary": args.out + ".summary.json"})
    rows = read_jsonl(args.generations, check=judge.check_generation)
    rows = [{"query": data.judge_query(r["prompt"]), **r} for r in rows]  # a row's own "query" wins
    records, summary = judge.judge_generations(rows, args.task, **client_settings(args))
    write_jsonl_atomic(args.out, records)
    summary.update(generations=args.generations, config=rows[0].get("config") if rows else None)
    write_atomic(args.out + ".summary.json", json.dumps(summary))
    print(json.dumps(summary), flush=True)
    return summary


def dpo_negatives_cmd(args):
    """The paper's DPO baseline: one unhelpful response per training example, written by the LLM."""
    if args.examples:
        refuse_same_paths(**{"--examples": args.examples, "--out": args.out, "--cache": cache_path(args)})
        rows = read_jsonl(args.examples)
    else:  # the task's own examples, so the ids are the ones train.py's dpo objective looks up
        refuse_same_paths(**{"--out": args.out, "--cache": cache_path(args)})
        tok = tokenizer.load_tokenizer(args.tokenizer)
        rows = [vars(e) for e in data.load_task(args.task, args.split, tok, args.max_len)]
    out = judge.dpo_rejected([{"query": data.judge_query(r["prompt"]), **r} for r in rows], **client_settings(args))
    write_jsonl_atomic(args.out, out)
    empty = len(rows) - len(out)
    log(f"dpo-negatives: wrote {len(out)} rejected responses to {args.out}"
        + (f", dropped {empty} empty replies" if empty else ""))


# ----------------------------------------------------------------------------- MAUVE (mauve.py does the math)
def featurize(texts, model_dir, batch_size=16, max_len=1024, device="cpu"):
    """MAUVE features: the final-layer (final-normed) hidden state at each text's last token -> (n, C).
    Texts are batched by length and right-padded; under causal attention the padding cannot reach the
    last real token, so its state is the unpadded one."""
    net, tok = hf.load(model_dir, device=device)
    net.eval()
    max_len = min(max_len, net.config.max_seq_len)
    bos = [tok.bos_id] if tok.bos_id is not None else []  # as an HF tokenizer would encode a whole text
    ids = [(bos + tok.encode(t))[:max_len] or [tok.eos_id] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    feats = np.zeros((len(ids), net.config.n_embd), np.float32)
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            lengths = torch.tensor([len(ids[i]) for i in batch])
            idx = torch.full((len(batch), int(lengths.max())), tok.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                idx[row, :len(ids[i])] = torch.tensor(ids[i])
            hidden = net(idx.to(device), return_hidden=True)  # (B, T, C)
            last = hidden[torch.arange(len(batch)), (lengths - 1).to(device)]  # (B, C)
            feats[batch] = last.float().cpu().numpy()
            done = min(s + batch_size, len(order))
            log(f"featurize: {done}/{len(order)}, ETA {(time.time() - t0) / done * (len(order) - done):.0f}s")
    return feats


def mauve_cmd(args):
    if args.p and args.q:
        p, q = np.load(args.p), np.load(args.q)
    elif args.p_text and args.q_text and args.featurizer:
        p_texts = [r[args.p_field] for r in read_jsonl(args.p_text, check=text_field(args.p_field))]
        q_texts = [r[args.q_field] for r in read_jsonl(args.q_text, check=text_field(args.q_field))]
        feats = featurize(p_texts + q_texts, args.featurizer, args.batch_size, args.max_len, args.device)
        p, q = feats[:len(p_texts)], feats[len(p_texts):]
    else:
        sys.exit("mauve: give --p and --q (.npy features), or --p-text, --q-text and --featurizer")
    score = mauve.compute_mauve(p, q, num_buckets=args.num_buckets, kmeans_num_redo=args.kmeans_num_redo,
                                kmeans_max_iter=args.kmeans_max_iter, seed=args.seed)
    result = {"mauve": score, "n_p": len(p), "n_q": len(q), "p": args.p or args.p_text, "q": args.q or args.q_text}
    if args.out:
        write_atomic(args.out, json.dumps(result))
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------- report
def run_name(model_dir):
    """A method's name from its model folder: out/dolly/cpo_mixnr/final -> cpo_mixnr."""
    parts = os.path.normpath(os.path.abspath(model_dir)).split(os.sep)
    while len(parts) > 1 and (parts[-1] in ("final", "model") or parts[-1].startswith("ckpt-")):
        parts.pop()
    return parts[-1]


def row_of(config, fallback):
    """(method, alpha, decoding) of a generations file's config; the file name when there is none."""
    if not config:
        return (fallback, None, "")
    method = config.get("method") or run_name(config.get("model", fallback))
    return (method, config.get("alpha"), config.get("decoding", ""))


def report(args):
    """A markdown table in the shape of the paper's: one row per method (and alpha) and decoding, with
    the judge's win rate and 95% CI and MAUVE, from every *.summary.json and *.mauve.json under RUN_DIR."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(args.run_dir, "**", "*.summary.json"), recursive=True)):
        with open(path) as f:
            s = json.load(f)
        rows.setdefault(row_of(s.get("config"), path), {})["judge"] = s
    for path in sorted(glob.glob(os.path.join(args.run_dir, "**", "*.mauve.json"), recursive=True)):
        with open(path) as f:
            m = json.load(f)
        config = None
        if str(m.get("p", "")).endswith(".jsonl") and os.path.isfile(m["p"]):
            config = (read_jsonl(m["p"]) or [{}])[0].get("config")
        rows.setdefault(row_of(config, os.path.basename(path).removesuffix(".mauve.json")), {})["mauve"] = m["mauve"]
    lines = ["| method | alpha | decoding | win rate [95% CI] | n | MAUVE |", "|---|---|---|---|---|---|"]
    key = lambda r: (r[0], -1 if r[1] is None else r[1], r[2])
    for (method, alpha, decoding) in sorted(rows, key=key):
        j, m = rows[(method, alpha, decoding)].get("judge"), rows[(method, alpha, decoding)].get("mauve")
        win = f"{j['win_rate']:.3f} [{j['ci_low']:.3f}, {j['ci_high']:.3f}]" if j and j["win_rate"] is not None else "-"
        lines.append(f"| {method} | {'-' if alpha is None else f'{alpha:g}'} | {decoding} | {win} | "
                     f"{j['n'] if j else '-'} | {'-' if m is None else f'{m:.3f}'} |")
    table = "\n".join(lines)
    write_atomic(os.path.join(args.run_dir, "report.md"), table + "\n")
    print(table)
    curves = {}  # win rate against alpha, one curve per method and decoding
    for (method, alpha, decoding), r in rows.items():
        if alpha is not None and r.get("judge") and r["judge"]["win_rate"] is not None:
            curves.setdefault(f"{method} {decoding}", []).append((alpha, r["judge"]["win_rate"]))
    if curves:
        path = os.path.join(args.run_dir, "win_rate_vs_alpha.svg")
        svg_chart(path, curves, "alpha (weight of the MLE model)", "win rate vs ground truth")
        log(f"report: plot in {path}")
    return table


def svg_chart(path, curves, xlabel, ylabel, title=""):
    """A line chart as a small SVG file (no plotting library needed). curves: {label: [(x, y) or (x, y, err)]},
    each drawn as a polyline with dots (and error bars of +-err), with ticked axes and a legend."""
    W, H, left, right, top, bottom = 640, 400, 60, 190, 30, 50  # pixels; the legend sits right of the plot
    pts = [p for ps in curves.values() for p in ps]
    err = lambda p: p[2] if len(p) > 2 else 0
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] - err(p) for p in pts), max(p[1] + err(p) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)  # all equal: a unit range, not an empty one
    sx = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    sy = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle">{escape(title)}</text>',
           f'<polyline points="{left},{top} {left},{H - bottom} {W - right},{H - bottom}" fill="none" stroke="black"/>',
           f'<text x="{(left + W - right) / 2}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text transform="translate(14,{(top + H - bottom) / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>']
    for i in range(5):  # ticks
        x, y = x0 + i / 4 * (x1 - x0), y0 + i / 4 * (y1 - y0)
        out.append(f'<text x="{sx(x):.1f}" y="{H - bottom + 16}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for n, (label, ps) in enumerate(sorted(curves.items())):
        c, ps = colours[n % len(colours)], sorted(ps)
        out.append(f'<polyline points="{" ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in ps)}" fill="none" stroke="{c}"/>')
        for p in ps:
            out.append(f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[1]):.1f}" r="3" fill="{c}"/>')
            if err(p):
                out.append(f'<line x1="{sx(p[0]):.1f}" x2="{sx(p[0]):.1f}" y1="{sy(p[1] - err(p)):.1f}" '
                           f'y2="{sy(p[1] + err(p)):.1f}" stroke="{c}"/>')
        ly = top + 10 + 18 * n
        out.append(f'<line x1="{W - right + 10}" x2="{W - right + 30}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{W - right + 35}" y="{ly + 4}">{escape(label)}</text>')
    write_atomic(path, "\n".join(out + ["</svg>"]) + "\n")


# ----------------------------------------------------------------------------- command line
def add_client_flags(sp, max_tokens):
    sp.add_argument("--judge-url", required=True, help="base URL of an OpenAI-compatible API; we POST "
                    "{url}/chat/completions "
                    "(e.g. https://api.openai.com/v1, http://localhost:8000/v1 for vLLM)")
    sp.add_argument("--judge-model", required=True, help="model name sent to the API; part of the cache key")
    sp.add_argument("--out", required=True, help="output jsonl")
    sp.add_argument("--cache", default=None, help="append-only reply cache (default: judge_cache.jsonl next to --out)")
    sp.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="name of the environment variable holding the API key (the key itself is never a flag)")
    sp.add_argument("--workers", type=number(int, 1), default=8, help="concurrent requests (>= 1)")
    sp.add_argument("--timeout", type=number(float, 0, strict=True), default=60.0,
                    help="seconds (> 0) before one request is abandoned and retried")
    sp.add_argument("--max-retries", type=number(int, 0), default=8, help="retries per request before the run stops")
    sp.add_argument("--backoff", type=number(float, 0, strict=True), default=1.0,
                    help="first retry delay in seconds; doubles each retry, jittered x0.5-1.5, capped at 60s "
                         "(a server's Retry-After too); Ctrl-C ends a wait at once, the cache keeps every answer")
    sp.add_argument("--temperature", type=number(float, 0), default=0.0, help="sampling temperature of the judge")
    sp.add_argument("--max-tokens", type=number(int, 1), default=max_tokens, help="reply length limit")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    command = lambda name, about: sub.add_parser(name, help=about, description=about,
                                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    sp = command("generate", "continuations of test prompts with a decoding config, resumable")
    sp.add_argument("--model", required=True, help="HF model folder (a checkpoint, an interpolated model) or hub name")
    sp.add_argument("--task", required=True, help="data.py task: synthetic | dolly[:src] | wiki:<src> | jsonl:<src>")
    sp.add_argument("--split", default="test", help="split of the task")
    sp.add_argument("--n", type=number(int, 0), default=1000, help="prompts, a seeded choice among the split (0: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the choice of prompts and of sampling")
    sp.add_argument("--out", required=True, help="jsonl to append to; ids already there are skipped")
    sp.add_argument("--max-len", type=number(int, 2), default=None, help="data.py's max_len, prompt + reference tokens "
                    "(default: the model's training max_len from its nanocpo.json, else its context; see hf.window_len)")
    sp.add_argument("--max-new-tokens", type=number(int, 1), default=256,
                    help="generation length limit; Wiki references are cut to it")
    sp.add_argument("--batch-size", type=number(int, 1), default=16, help="prompts per generate call")
    sp.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy; > 0 samples")
    sp.add_argument("--top-k", type=number(int, 1), default=None, help="sample among the k most likely tokens")
    sp.add_argument("--top-p", type=number(float, 0, strict=True, high=1), default=None,
                    help="sample within the smallest set of mass p (nucleus), 0 < p <= 1")
    sp.add_argument("--num-beams", type=number(int, 1), default=1, help="> 1: beam search (sampling flags ignored)")
    sp.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob sum / length ** this")
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="e.g. cpu, cuda:1")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights dtype; auto = the checkpoint's")
    sp.set_defaults(func=generate)

    sp = command("interpolate", "weight-space ensembles alpha * MLE + (1 - alpha) * CPO")
    sp.add_argument("--mle", required=True, help="HF folder of the MLE model (alpha = 1)")
    sp.add_argument("--cpo", required=True, help="HF folder of the CPO model (alpha = 0), same architecture")
    sp.add_argument("--alphas", required=True, help="comma-separated weights of the MLE model, e.g. 0,0.1,0.5,1")
    sp.add_argument("--out", required=True, help="folder; each alpha goes to OUT/alpha_<alpha>")
    sp.set_defaults(func=interpolate)

    sp = command("judge", "win rate against the ground truth, judged by an LLM in both orders")
    sp.add_argument("--generations", required=True,
                    help="generate's jsonl: {id, prompt, reference, generation, config}")
    sp.add_argument("--task", required=True, choices=sorted(judge.JUDGE_TEMPLATES), help="which paper template to use")
    add_client_flags(sp, max_tokens=5)
    sp.set_defaults(func=judge_cmd)

    sp = command("dpo-negatives", "unhelpful responses for the DPO baseline, written by an LLM")
    sp.add_argument("--examples", help='jsonl of {"id", "prompt", "response"}; or instead:')
    sp.add_argument("--task", help="a data.py task (dolly, wiki:<src>, jsonl:<src>, synthetic) whose --split is used")
    sp.add_argument("--split", default="train", help="split of --task")
    sp.add_argument("--tokenizer", help="folder with the tokenizer files of the model to train (data.py drops "
                    "examples by token length, so ids match train.py's)")
    sp.add_argument("--max-len", type=number(int, 2), default=1024, help="train.py's max_len, for the same examples")
    add_client_flags(sp, max_tokens=256)
    sp.set_defaults(func=dpo_negatives_cmd)

    sp = command("mauve", "MAUVE between two feature sets (or texts featurized by a model)")
    sp.add_argument("--p", help=".npy (n_p, d) features of the model's text")
    sp.add_argument("--q", help=".npy (n_q, d) features of the human text")
    sp.add_argument("--p-text", help="jsonl whose --p-field is featurized (default field: generation)")
    sp.add_argument("--q-text", help="jsonl whose --q-field is featurized (default field: reference)")
    sp.add_argument("--p-field", default="generation", help="text field of --p-text")
    sp.add_argument("--q-field", default="reference", help="text field of --q-text")
    sp.add_argument("--featurizer", help="model folder or hub name for features (the reference uses gpt2-large)")
    sp.add_argument("--batch-size", type=number(int, 1), default=16, help="texts per featurizer forward pass")
    sp.add_argument("--max-len", type=number(int, 1), default=1024, help="tokens kept from the start of each text")
    sp.add_argument("--device", default="cpu", help="featurizer device, e.g. cuda")
    sp.add_argument("--num-buckets", type=lambda t: t if t == "auto" else number(int, 1)(t), default="auto",
                    help='k-means clusters (>= 1, at most either set\'s samples), or "auto" = max(2, min(n_p, n_q) / 10)')
    sp.add_argument("--kmeans-num-redo", type=number(int, 1), default=5,
                    help="k-means restarts; the best objective is kept")
    sp.add_argument("--kmeans-max-iter", type=number(int, 1), default=500, help="k-means iteration limit per restart")
    sp.add_argument("--seed", type=int, default=25, help="seed of PCA subsampling and k-means initialisation")
    sp.add_argument("--out", default=None, help="also write the JSON result here (report reads *.mauve.json)")
    sp.set_defaults(func=mauve_cmd)

    sp = command("report", "markdown table (and an SVG plot of win rate against alpha) of a run folder")
    sp.add_argument("run_dir", help="folder searched for *.summary.json (judge) and *.mauve.json (mauve --out)")
    sp.set_defaults(func=report)

    args = parser.parse_args(argv)
    if args.command == "dpo-negatives" and not (args.examples or (args.task and args.tokenizer)):
        parser.error("dpo-negatives needs --examples, or --task and --tokenizer")
    try:
        return args.func(args)
    except (judge.JudgeError, ValueError) as e:  # a refusal that names its cause: one line, no traceback
        sys.exit(f"{args.command}: {e}")


if __name__ == "__main__":
    main()
