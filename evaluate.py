"""
Evaluation: the paper's three measurements, cheap to rerun and safe to interrupt.

    python evaluate.py generate --model out/cpo --task dolly --out out/cpo/greedy.jsonl      # continuations
    python evaluate.py interpolate --mle out/mle --cpo out/cpo --alphas 0,0.3,0.9,1 --out out/ens
    OPENAI_API_KEY=... python evaluate.py judge --generations out/cpo/greedy.jsonl --task dolly \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-3.5-turbo --out out/cpo/greedy.judge.jsonl
    OPENAI_API_KEY=... python evaluate.py dpo-negatives --task dolly --tokenizer gpt2-xl-folder \\
        --max-len 1024 --judge-url https://api.openai.com/v1 --judge-model gpt-3.5-turbo \\
        --out out/dpo_negatives.jsonl
    python evaluate.py mauve --p p.npy --q q.npy
    python evaluate.py mauve --p-text gens.jsonl --q-text gens.jsonl --featurizer gpt2-large   # from text
    python evaluate.py report out/

The judge's client and rules live in judge.py, MAUVE in mauve.py (each usable on its own), decoding in
decoding.py and the SVG chart in charts.py; this file reads and writes the files around them. The
experiment of every method on a CPU is miniature.py.

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

import numpy as np
import torch

import data
import decoding
import hf
import judge
import mauve
import tokenizer
from charts import svg_chart
from common import (end_torn_line, log, number, read_jsonl, refuse_same_paths, text_field, write_atomic,
                    write_folder_atomic, write_jsonl_atomic)
from model import resolve_device


# ----------------------------------------------------------------------------- generate
def generate(args):
    """Continuations of N test prompts (a seeded choice, the same for every model) -> jsonl, resumable."""
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    net, tok = hf.load(args.model, device=args.device, dtype=dtype)
    examples = data.load_task(args.task, args.split, tok, hf.window_len(args.model, net, args.max_len))
    if args.n and args.n < len(examples):
        examples = random.Random(args.seed).sample(examples, args.n)
    written = written_ids(args.out)
    todo = [e for e in examples if e.id not in written]
    todo.sort(key=lambda e: len(e.prompt_ids))  # similar lengths in a batch: less padding
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    num_beams=args.num_beams, length_penalty=args.length_penalty)
    config = generation_config(args, len(examples), settings)
    log(f"generate: {len(examples)} prompts, {len(examples) - len(todo)} already in {args.out}, "
        f"{len(todo)} to go")
    if not todo:
        return
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    wiki = args.task.startswith("wiki")  # a Wiki reference is cut to what a generation may produce
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with open(args.out, "a") as f:
        end_torn_line(f, args.out)
        for s in range(0, len(todo), args.batch_size):
            batch = todo[s:s + args.batch_size]
            prompts = [e.prompt_ids for e in batch]
            gens = decoding.generate_batch(net, tok, prompts, args.max_new_tokens, settings, generator)
            for e, ids in zip(batch, gens):
                if wiki:  # as MAUVE and the judge compare them
                    reference = decoding.new_text(tok, e.continuation_ids[:args.max_new_tokens])
                else:
                    reference = e.response
                row = {"id": e.id, "prompt": e.prompt, "reference": reference,
                       "generation": decoding.new_text(tok, ids), "config": config}
                f.write(json.dumps(row) + "\n")
            f.flush()  # a crash loses at most this batch
            done = s + len(batch)
            per_prompt = (time.time() - t0) / done
            log(f"generate: {done}/{len(todo)}, {per_prompt:.2f}s per prompt, "
                f"ETA {per_prompt * (len(todo) - done):.0f}s")


def written_ids(path):
    """The ids already in a generations file (a torn last line skipped); none when there is no file."""
    if not os.path.exists(path):
        return set()
    return {r["id"] for r in read_jsonl(path, skip_torn_last_line=True)}


def generation_config(args, n, settings):
    """The "config" of every generated row: the model folder, the task, the decoding settings and its
    label; and a weight-space ensemble's interpolation.json (its alpha)."""
    config = dict(model=os.path.abspath(args.model), task=args.task, split=args.split, n=n, seed=args.seed,
                  max_new_tokens=args.max_new_tokens, decoding=decoding.decoding_label(settings), **settings)
    info = os.path.join(args.model, "interpolation.json")
    if os.path.isfile(info):
        with open(info) as f:
            config.update(json.load(f))
    return config


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
    diff = [f"{k}: {v} vs {getattr(configs[1], k)}"
            for k, v in vars(configs[0]).items() if getattr(configs[1], k) != v]
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
            mixed = {k: mix(a[k], b[k], alpha) for k in a}
            hf.write_safetensors(os.path.join(tmp, os.path.basename(path)), mixed, {"format": "pt"})
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
            raise ValueError(f"--alphas {text!r}: {item.strip()} is outside [0, 1], or another alpha there "
                             f"is also written to {alpha_folder(alpha)}/ (give each once, differing within "
                             "6 digits)")
        alphas[alpha_folder(alpha)] = alpha
    return list(alphas.values())


def interpolate(args):
    try:
        alphas = parse_alphas(args.alphas)
        files = check_same_architecture(args.mle, args.cpo)
    except ValueError as e:
        sys.exit(f"interpolate: {e}")
    for alpha in alphas:
        out_dir = os.path.join(args.out, alpha_folder(alpha))
        out = interpolate_folder(args.mle, args.cpo, alpha, out_dir, files)
        log(f"interpolate: alpha {alpha:g} -> {out}")


# ----------------------------------------------------------------------------- judge (judge.py asks)
def cache_path(args):
    return args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")


def client_settings(args):
    """judge.ask_all's keyword arguments from the command line; the key from the environment only."""
    return dict(cache_path=cache_path(args), url=args.judge_url, model=args.judge_model,
                api_key=judge.api_key_from_env(args.api_key_env), workers=args.workers,
                max_tokens=args.max_tokens, temperature=args.temperature, timeout=args.timeout,
                max_retries=args.max_retries, backoff=args.backoff)


def judge_cmd(args):
    """Win rate against the references, both orders, cached; the judge sees data.judge_query of each
    prompt."""
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
    queries = [{"query": data.judge_query(r["prompt"]), **r} for r in rows]
    out = judge.dpo_rejected(queries, **client_settings(args))
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
            hidden = net(idx.to(device), return_hidden=True)                   # (B, T, C)
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
    result = {"mauve": score, "n_p": len(p), "n_q": len(q),
              "p": args.p or args.p_text, "q": args.q or args.q_text}
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
    rows = report_rows(args.run_dir)
    lines = ["| method | alpha | decoding | win rate [95% CI] | n | MAUVE |", "|---|---|---|---|---|---|"]
    for key in sorted(rows, key=table_order):
        method, alpha, label = key
        j, m = rows[key].get("judge"), rows[key].get("mauve")
        if j and j["win_rate"] is not None:
            win = f"{j['win_rate']:.3f} [{j['ci_low']:.3f}, {j['ci_high']:.3f}]"
        else:
            win = "-"
        lines.append(f"| {method} | {'-' if alpha is None else f'{alpha:g}'} | {label} | {win} | "
                     f"{j['n'] if j else '-'} | {'-' if m is None else f'{m:.3f}'} |")
    table = "\n".join(lines)
    write_atomic(os.path.join(args.run_dir, "report.md"), table + "\n")
    print(table)
    curves = {}  # win rate against alpha, one curve per method and decoding
    for (method, alpha, label), r in rows.items():
        if alpha is not None and r.get("judge") and r["judge"]["win_rate"] is not None:
            curves.setdefault(f"{method} {label}", []).append((alpha, r["judge"]["win_rate"]))
    if curves:
        path = os.path.join(args.run_dir, "win_rate_vs_alpha.svg")
        write_atomic(path, svg_chart(curves, "alpha (weight of the MLE model)", "win rate vs ground truth"))
        log(f"report: plot in {path}")
    return table


def table_order(row):
    """report's rows by method, then alpha (none first), then decoding."""
    method, alpha, label = row
    return (method, -1 if alpha is None else alpha, label)


def report_rows(run_dir):
    """{(method, alpha, decoding): {"judge": a judge summary, "mauve": a MAUVE score}} of every
    *.summary.json and *.mauve.json under run_dir."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "*.summary.json"), recursive=True)):
        with open(path) as f:
            s = json.load(f)
        rows.setdefault(row_of(s.get("config"), path), {})["judge"] = s
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "*.mauve.json"), recursive=True)):
        with open(path) as f:
            m = json.load(f)
        config = None
        if str(m.get("p", "")).endswith(".jsonl") and os.path.isfile(m["p"]):
            config = (read_jsonl(m["p"]) or [{}])[0].get("config")
        fallback = os.path.basename(path).removesuffix(".mauve.json")
        rows.setdefault(row_of(config, fallback), {})["mauve"] = m["mauve"]
    return rows


# ----------------------------------------------------------------------------- command line
def add_generate_flags(sp):
    sp.add_argument("--model", required=True,
                    help="HF model folder (a checkpoint, an interpolated model) or hub name")
    sp.add_argument("--task", required=True,
                    help="data.py task: synthetic | dolly[:src] | wiki:<src> | jsonl:<src>")
    sp.add_argument("--split", default="test", help="split of the task")
    sp.add_argument("--n", type=number(int, 0), default=1000,
                    help="prompts, a seeded choice among the split (0: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the choice of prompts and of sampling")
    sp.add_argument("--out", required=True, help="jsonl to append to; ids already there are skipped")
    sp.add_argument("--max-len", type=number(int, 2), default=None,
                    help="data.py's max_len, prompt + reference tokens (default: the model's training "
                         "max_len from its nanocpo.json, else its context; see hf.window_len)")
    sp.add_argument("--max-new-tokens", type=number(int, 1), default=256,
                    help="generation length limit; Wiki references are cut to it")
    sp.add_argument("--batch-size", type=number(int, 1), default=16, help="prompts per generate call")
    sp.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy; > 0 samples")
    sp.add_argument("--top-k", type=number(int, 1), default=None,
                    help="sample among the k most likely tokens")
    sp.add_argument("--top-p", type=number(float, 0, strict=True, high=1), default=None,
                    help="sample within the smallest set of mass p (nucleus), 0 < p <= 1")
    sp.add_argument("--num-beams", type=number(int, 1), default=1,
                    help="> 1: beam search (sampling flags ignored)")
    sp.add_argument("--length-penalty", type=float, default=1.0,
                    help="beam score = log-prob sum / length ** this")
    sp.add_argument("--device", default=resolve_device("auto"),
                    help="e.g. cpu, cuda:1")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights dtype; auto = the checkpoint's")


def add_interpolate_flags(sp):
    sp.add_argument("--mle", required=True, help="HF folder of the MLE model (alpha = 1)")
    sp.add_argument("--cpo", required=True, help="HF folder of the CPO model (alpha = 0), same architecture")
    sp.add_argument("--alphas", required=True,
                    help="comma-separated weights of the MLE model, e.g. 0,0.1,0.5,1")
    sp.add_argument("--out", required=True, help="folder; each alpha goes to OUT/alpha_<alpha>")


def add_client_flags(sp, max_tokens):
    """The judge's API client: judge and dpo-negatives."""
    sp.add_argument("--judge-url", required=True,
                    help="base URL of an OpenAI-compatible API; we POST {url}/chat/completions "
                         "(e.g. https://api.openai.com/v1, http://localhost:8000/v1 for vLLM)")
    sp.add_argument("--judge-model", required=True, help="model name sent to the API; part of the cache key")
    sp.add_argument("--out", required=True, help="output jsonl")
    sp.add_argument("--cache", default=None,
                    help="append-only reply cache (default: judge_cache.jsonl next to --out)")
    sp.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="name of the environment variable holding the API key (the key itself is never "
                         "a flag)")
    sp.add_argument("--workers", type=number(int, 1), default=8, help="concurrent requests (>= 1)")
    sp.add_argument("--timeout", type=number(float, 0, strict=True), default=60.0,
                    help="seconds (> 0) before one request is abandoned and retried")
    sp.add_argument("--max-retries", type=number(int, 0), default=8,
                    help="retries per request before the run stops")
    sp.add_argument("--backoff", type=number(float, 0, strict=True), default=1.0,
                    help="first retry delay in seconds; doubles each retry, jittered x0.5-1.5, capped at "
                         "60s (a server's Retry-After too); Ctrl-C ends a wait at once, the cache keeps "
                         "every answer")
    sp.add_argument("--temperature", type=number(float, 0), default=0.0,
                    help="sampling temperature of the judge")
    sp.add_argument("--max-tokens", type=number(int, 1), default=max_tokens, help="reply length limit")


def add_judge_flags(sp):
    sp.add_argument("--generations", required=True,
                    help="generate's jsonl: {id, prompt, reference, generation, config}")
    sp.add_argument("--task", required=True, choices=sorted(judge.JUDGE_TEMPLATES),
                    help="which paper template to use")
    add_client_flags(sp, max_tokens=5)


def add_dpo_negatives_flags(sp):
    sp.add_argument("--examples", help='jsonl of {"id", "prompt", "response"}; or instead:')
    sp.add_argument("--task",
                    help="a data.py task (dolly, wiki:<src>, jsonl:<src>, synthetic) whose --split is used")
    sp.add_argument("--split", default="train", help="split of --task")
    sp.add_argument("--tokenizer",
                    help="folder with the tokenizer files of the model to train (data.py drops examples by "
                         "token length, so ids match train.py's)")
    sp.add_argument("--max-len", type=number(int, 2), default=1024,
                    help="train.py's max_len, for the same examples")
    add_client_flags(sp, max_tokens=256)


def add_mauve_flags(sp):
    sp.add_argument("--p", help=".npy (n_p, d) features of the model's text")
    sp.add_argument("--q", help=".npy (n_q, d) features of the human text")
    sp.add_argument("--p-text", help="jsonl whose --p-field is featurized (default field: generation)")
    sp.add_argument("--q-text", help="jsonl whose --q-field is featurized (default field: reference)")
    sp.add_argument("--p-field", default="generation", help="text field of --p-text")
    sp.add_argument("--q-field", default="reference", help="text field of --q-text")
    sp.add_argument("--featurizer",
                    help="model folder or hub name for features (the reference uses gpt2-large)")
    sp.add_argument("--batch-size", type=number(int, 1), default=16, help="texts per featurizer forward pass")
    sp.add_argument("--max-len", type=number(int, 1), default=1024,
                    help="tokens kept from the start of each text")
    sp.add_argument("--device", default="cpu", help="featurizer device, e.g. cuda")
    sp.add_argument("--num-buckets", type=lambda t: t if t == "auto" else number(int, 1)(t), default="auto",
                    help='k-means clusters (>= 1, at most either set\'s samples), or "auto" = '
                         "max(2, min(n_p, n_q) / 10)")
    sp.add_argument("--kmeans-num-redo", type=number(int, 1), default=5,
                    help="k-means restarts; the best objective is kept")
    sp.add_argument("--kmeans-max-iter", type=number(int, 1), default=500,
                    help="k-means iteration limit per restart")
    sp.add_argument("--seed", type=int, default=25, help="seed of PCA subsampling and k-means initialisation")
    sp.add_argument("--out", default=None, help="also write the JSON result here (report reads *.mauve.json)")


def add_report_flags(sp):
    sp.add_argument("run_dir",
                    help="folder searched for *.summary.json (judge) and *.mauve.json (mauve --out)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, about, add_flags, func):
        sp = sub.add_parser(name, help=about, description=about,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_flags(sp)
        sp.set_defaults(func=func)

    command("generate", "continuations of test prompts with a decoding config, resumable",
            add_generate_flags, generate)
    command("interpolate", "weight-space ensembles alpha * MLE + (1 - alpha) * CPO",
            add_interpolate_flags, interpolate)
    command("judge", "win rate against the ground truth, judged by an LLM in both orders",
            add_judge_flags, judge_cmd)
    command("dpo-negatives", "unhelpful responses for the DPO baseline, written by an LLM",
            add_dpo_negatives_flags, dpo_negatives_cmd)
    command("mauve", "MAUVE between two feature sets (or texts featurized by a model)",
            add_mauve_flags, mauve_cmd)
    command("report", "markdown table (and an SVG plot of win rate against alpha) of a run folder",
            add_report_flags, report)

    args = parser.parse_args(argv)
    if args.command == "dpo-negatives" and not (args.examples or (args.task and args.tokenizer)):
        parser.error("dpo-negatives needs --examples, or --task and --tokenizer")
    try:
        return args.func(args)
    except (judge.JudgeError, ValueError) as e:  # a refusal that names its cause: one line, no traceback
        sys.exit(f"{args.command}: {e}")


if __name__ == "__main__":
    main()
