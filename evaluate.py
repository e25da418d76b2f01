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
    python evaluate.py miniature --out out/miniature        # every method on the synthetic task, 3 seeds, CPU
    python evaluate.py miniature --scale tiny --seeds 0     # the same at a smoke-test size (seconds)

Files
- generations (generate's output), jsonl, one line per prompt:
  {"id", "prompt", "reference", "generation", "config"}; config holds the model folder, the task and the
  decoding flags (and "alpha" when the model came from `interpolate`).
- judge cache, jsonl, append-only: {"key": sha256(json([judge model, prompt])), "reply": text}. One line is
  written and flushed per answer, so a crash loses only the requests in flight; a torn last line is
  skipped on reading. Defaults to judge_cache.jsonl next to --out, shared by every judge run there.
- judgements (judge --out), jsonl, one line per pair: {"id", "verdict" (win|loss|tie|invalid),
  "reply_model_as_a", "reply_model_as_b"}; the summary goes to stdout and to <out>.summary.json.
- DPO negatives (dpo-negatives --out), jsonl: {"id", "rejected"}: the example's id (data.py's, e.g.
  "dolly-123", when read with --task; the file's with --examples, a jsonl of {"id", "prompt", "response"})
  and the judge model's unhelpful response, stripped; empty replies are left out. This is the file
  train.py's `dpo` objective reads (its dpo_rejected setting).
- MAUVE results (mauve --out), JSON: {"mauve", "n_p", "n_q", "p", "q"}; report reads *.mauve.json.
- interpolated models: OUT/alpha_<alpha>/, an HF folder (config and tokenizer copied from the MLE model)
  plus interpolation.json {"alpha", "mle", "cpo", "method"}, which generate copies into its config.

Judging (the paper's templates, verbatim). Every pair is asked in both orders, the model's generation as
A and then as B, against the ground truth. A pair is a win when both answers pick the model, a loss when
both pick the ground truth, a tie when they split (position bias), and invalid when either answer is
not a lone "A" or "B". Parsing is strict: trim whitespace, drop one trailing period, then the answer must
be exactly one letter; we accept either case (" b " -> B: a lone lowercase letter is not ambiguous; the
strictness is about refusing extra words, which we never guess at). win_rate = (wins + ties / 2) / n over
the n valid pairs, with a 95% Wilson score interval for that proportion (each pair treated as a Bernoulli
trial of the same mean: conservative, since a tie varies less than a coin, and never of zero width at 0
or 1). single_order_win_rate is the paper's kind of number: the share of valid answers that pick the
model when it is shown as Response A. The API key is read from an environment variable only
(--api-key-env), sent in the Authorization header, and scrubbed from every message we print or raise.
Transport failures (after retries) stop the run with a message; the cache keeps every answer so far.

MAUVE (Pillutla et al. 2021), written with numpy/scipy to the reference package's algorithm and defaults
(mauve-text 0.4.0): L2-normalise the rows, PCA on q then p keeping the fewest components explaining 90% of
the variance, k-means (k = n/10, best of 5 runs), cluster histograms, and the area under the divergence
curve. Two deliberate differences, neither of which moves the score beyond k-means' seed noise:
k-means stops at a fixed point instead of always running 500 iterations (same result, much faster), and
the area is integrated along the mixture-weight order instead of after sorting the points, so exact ties
(p == q) give 1 rather than whatever order the sort picked. Features come from a model folder (the
reference uses gpt2-large): the final-layer hidden state at each text's last token.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime

import numpy as np
import requests
import scipy.sparse

# torch and our model/data files are imported inside the functions that run models: the judge and MAUVE
# need neither, so `evaluate.py judge` starts instantly and runs where torch is not installed.


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def end_torn_line(f, path):
    """Before appending: if a crash left the file without a final newline, end that line first."""
    if os.path.getsize(path) > 0:
        with open(path, "rb") as g:
            g.seek(-1, os.SEEK_END)
            if g.read(1) != b"\n":
                f.write("\n")


def write_atomic(path, text):
    """Write to a temp file beside path, then rename: a crash never leaves a half-written result."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


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
    import torch
    room = net.config.max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"{net.config.max_seq_len} positions")
    bos = tok.bos_id is not None
    prompts = [p if len(p) <= room else p[:1] * bos + p[len(p) - room + bos:] for p in prompts]
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    from model import left_pad
    idx, mask = left_pad(prompts, pad)  # (B, T) each
    device = net.tok_emb.weight.device
    out = net.generate(idx.to(device), max_new_tokens, attention_mask=mask.to(device), eos_id=tok.eos_id,
                       pad_id=pad, generator=generator, **decoding)  # (B, max_new_tokens)
    return out.tolist()


def new_text(tok, ids):
    """Decoded new tokens up to, not including, the first EOS."""
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode(ids)


def task_scores(model, tok, examples, task, batch_size=32, max_new_tokens=None):
    """Greedy continuations of held-out examples -> {metric: value}, for train.py's summary table.
    synthetic: data.score_synthetic's exact metrics; other tasks: the share that stopped and their
    mean length in new tokens (quality there needs the judge or MAUVE)."""
    import data
    if max_new_tokens is None:
        max_new_tokens = data.SYNTHETIC_MAX_NEW_TOKENS if task == "synthetic" else 256
    greedy = dict(temperature=0.0, top_k=None, top_p=None, num_beams=1, length_penalty=1.0)
    gens = []
    for s in range(0, len(examples), batch_size):
        gens += generate_batch(model, tok, [e.prompt_ids for e in examples[s:s + batch_size]], max_new_tokens, greedy)
    if task == "synthetic":
        return data.score_synthetic(gens, [e.continuation_ids for e in examples], tok.eos_id)
    lengths = [len(data.cut_at_eos(g, tok.eos_id)) for g in gens]
    return {"stopped": sum(tok.eos_id in g for g in gens) / len(gens), "mean_new_tokens": sum(lengths) / len(lengths)}


def written_ids(path):
    """Ids already in a generations file; a line torn by a crash is ignored (and regenerated)."""
    ids = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    ids.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue
    return ids


def generate(args):
    """Continuations of N test prompts (a seeded choice, the same for every model) -> jsonl, resumable."""
    import torch
    import data
    import model as modeling
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    net, tok = modeling.load(args.model, device=args.device, dtype=dtype)
    examples = data.load_task(args.task, args.split, tok, args.max_len)
    if args.n and args.n < len(examples):
        examples = random.Random(args.seed).sample(examples, args.n)
    written = written_ids(args.out)
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
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    with open(args.out, "a") as f:
        end_torn_line(f, args.out)
        for s in range(0, len(todo), args.batch_size):
            batch = todo[s:s + args.batch_size]
            gens = generate_batch(net, tok, [e.prompt_ids for e in batch], args.max_new_tokens, decoding, generator)
            for e, ids in zip(batch, gens):
                f.write(json.dumps({"id": e.id, "prompt": e.prompt, "reference": e.response,
                                    "generation": new_text(tok, ids), "config": config}) + "\n")
            f.flush()  # a crash loses at most this batch
            done = s + len(batch)
            log(f"generate: {done}/{len(todo)}, {(time.time() - t0) / done:.2f}s per prompt, "
                f"ETA {(time.time() - t0) / done * (len(todo) - done):.0f}s")


# ----------------------------------------------------------------------------- weight-space ensemble
def safetensors_files(folder):
    """{tensor name: file} of an HF folder's weights: model.safetensors, or shards and their index."""
    import model as modeling
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return dict.fromkeys(modeling.read_safetensors(single), single)  # reads the header only (memory map)
    raise ValueError(f"{folder}: no model.safetensors (interpolate reads the safetensors folders that "
                     "save_pretrained writes)")


def check_same_architecture(mle_dir, cpo_dir):
    """Refuse to average two models that are not the same network: config, names, shapes and dtypes."""
    import model as modeling
    configs = []
    for d in (mle_dir, cpo_dir):
        with open(os.path.join(d, "config.json")) as f:
            configs.append(modeling.ModelConfig.from_hf(json.load(f)))
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
            into.update(modeling.read_safetensors(path))  # memory maps: no weights read yet
    for name in mle:
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            raise ValueError(f"tensor {name!r}: {tuple(a[name].shape)} {a[name].dtype} in {mle_dir} but "
                             f"{tuple(b[name].shape)} {b[name].dtype} in {cpo_dir}")
    return mle, cpo


def mix(a, b, alpha):
    """alpha * a + (1 - alpha) * b, computed in float32 (float64 stays float64), stored as a's dtype.
    The endpoints return the tensors themselves, so alpha = 1 and 0 reproduce them bit for bit."""
    import torch
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
    import model as modeling
    mle, cpo = files or check_same_architecture(mle_dir, cpo_dir)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp", dir=os.path.dirname(out_dir))
    try:
        for name in os.listdir(mle_dir):  # config.json, tokenizer files, generation_config.json, our index
            src = os.path.join(mle_dir, name)
            weights = name.endswith(WEIGHT_SUFFIXES) and name != "model.safetensors.index.json"
            if os.path.isfile(src) and not weights:  # never another copy of theta_MLE, in any format
                shutil.copy(src, tmp)
        for path in sorted(set(mle.values())):
            a = modeling.read_safetensors(path)
            b_files = {cpo[k] for k in a}
            b = {}
            for p in b_files:
                b.update(modeling.read_safetensors(p))
            out = {k: mix(a[k], b[k], alpha) for k in a}
            modeling.write_safetensors(os.path.join(tmp, os.path.basename(path)), out, {"format": "pt"})
            del out
        with open(os.path.join(tmp, "interpolation.json"), "w") as f:
            json.dump({"alpha": alpha, "mle": os.path.abspath(mle_dir), "cpo": os.path.abspath(cpo_dir),
                       "method": run_name(cpo_dir)}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def interpolate(args):
    alphas = [float(a) for a in args.alphas.split(",")]
    if any(not 0 <= a <= 1 for a in alphas):
        sys.exit(f"interpolate: alphas must lie in [0, 1], got {args.alphas}")
    try:
        files = check_same_architecture(args.mle, args.cpo)
    except ValueError as e:
        sys.exit(f"interpolate: {e}")
    for alpha in alphas:
        out = interpolate_folder(args.mle, args.cpo, alpha, os.path.join(args.out, f"alpha_{alpha:g}"), files)
        log(f"interpolate: alpha {alpha:g} -> {out}")


# ----------------------------------------------------------------------------- judge: the HTTP client
JUDGE_TEMPLATES = {  # verbatim from the paper; filled in order (query, A, B)
    "dolly": 'For the following query to a chatbot, which response is more helpful?\n Query: {}\n Response A: {}\n'
             ' Response B: {}\n State only "A" or "B" to indicate which response is more helpful.\n More helpful:',
    "wiki": 'For the following prefix, which continuation is better?\n Prefix: {}\n Continuation A: {}\n'
            ' Continuation B: {}\n State only "A" or "B" to indicate which continuation is more helpful.\n Better:',
}
DPO_NEGATIVE_TEMPLATE = ('Given the ground truth instruction and response, can you generate a not helpful response?\n'
                         ' Instruction: {}\nResponse: {}\nNot helpful response:')


class JudgeError(RuntimeError):
    """The judge could not be reached or refused us; the message never contains the API key."""


def scrub(text, secret):
    return str(text).replace(secret, "***") if secret else str(text)


_thread = threading.local()


def http_session():
    """One requests.Session per worker thread (keep-alive), since Sessions are not documented thread-safe."""
    if not hasattr(_thread, "session"):
        _thread.session = requests.Session()
    return _thread.session


def parse_retry_after(value):
    """Retry-After header -> seconds (it is either a number of seconds or an HTTP date), None if absent."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def chat_completion(prompt, url, model, api_key, max_tokens, temperature, timeout, max_retries, backoff,
                    max_backoff=60.0, stop=None):
    """One user prompt -> the reply text, from any OpenAI-compatible POST {url}/chat/completions.
    Timeouts, connection errors, 429, 5xx and malformed bodies are retried with exponential backoff and
    jitter (or after Retry-After when the server sends one); other HTTP errors (bad key, bad request)
    fail at once, since repeating them cannot help. Raises JudgeError, with the key scrubbed. Setting the
    `stop` event makes it give up before its next attempt (the run failed elsewhere)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for attempt in range(max_retries + 1):
        if stop is not None and stop.is_set():
            raise JudgeError("stopped: the run failed on another request")
        wait = None
        try:
            r = http_session().post(url.rstrip("/") + "/chat/completions", json=body, headers=headers, timeout=timeout)
            if r.status_code == 429 or r.status_code >= 500:
                problem, wait = f"HTTP {r.status_code}", parse_retry_after(r.headers.get("Retry-After"))
            elif r.status_code != 200:
                raise JudgeError(scrub(f"HTTP {r.status_code} from {url}: {r.text[:300]}", api_key))
            else:
                try:
                    reply = r.json()["choices"][0]["message"]["content"]
                    if isinstance(reply, str):
                        return reply
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
                problem = "malformed response body"
        except (requests.Timeout, requests.ConnectionError) as e:
            problem = scrub(f"{type(e).__name__}: {e}", api_key)[:300]
        except requests.RequestException as e:  # e.g. a key with a newline: the message would quote the header
            raise JudgeError(scrub(f"request to {url} failed: {type(e).__name__}: {e}", api_key)) from None
        if attempt == max_retries or (stop is not None and stop.is_set()):
            break
        if wait is None:
            wait = min(max_backoff, backoff * 2 ** attempt) * random.uniform(0.5, 1.5)  # jitter: no thundering herd
        log(f"judge: {problem}; retry {attempt + 1}/{max_retries} in {wait:.2f}s")
        time.sleep(wait)
    raise JudgeError(f"giving up on a request after {max_retries + 1} attempts, last: {problem}")


def cache_key(model, prompt):
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


def load_cache(path):
    """{key: reply} from an append-only cache file; a line torn by a crash mid-write is skipped."""
    cache = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    cache[rec["key"]] = rec["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
    return cache


def ask_all(prompts, cache_path, args, api_key, max_tokens):
    """Replies to all prompts, in order. Only the prompts missing from the cache are sent (each distinct
    prompt once), args.workers at a time; every reply is appended to the cache and flushed as it arrives."""
    keys = [cache_key(args.judge_model, p) for p in prompts]
    cache = load_cache(cache_path)
    todo = {k: p for k, p in zip(keys, prompts) if k not in cache}
    log(f"judge: {len(prompts)} prompts, {len(prompts) - len(todo)} answered in {cache_path}, sending {len(todo)}")
    if not todo:
        return [cache[k] for k in keys]
    stop = threading.Event()
    send = lambda p: chat_completion(p, args.judge_url, args.judge_model, api_key, max_tokens, args.temperature,
                                     args.timeout, args.max_retries, args.backoff, stop=stop)
    t0 = time.time()
    pool = ThreadPoolExecutor(max_workers=args.workers)
    try:
        with open(cache_path, "a") as f:
            end_torn_line(f, cache_path)
            futures = {pool.submit(send, p): k for k, p in todo.items()}
            for done, future in enumerate(as_completed(futures), 1):
                key = futures[future]
                cache[key] = future.result()
                f.write(json.dumps({"key": key, "reply": cache[key]}) + "\n")
                f.flush()
                if done % 50 == 0 or done == len(todo):
                    eta = (time.time() - t0) / done * (len(todo) - done)
                    log(f"judge: {done}/{len(todo)} answered, ETA {eta:.0f}s")
    finally:  # on an error or Ctrl-C: drop the queued requests, and retry none of those in flight
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return [cache[k] for k in keys]


def api_key_from_env(name):
    key = os.environ.get(name, "")
    if not key:
        log(f"judge: ${name} is empty; sending no Authorization header (fine for a local vLLM/llama.cpp server)")
    return key


# ----------------------------------------------------------------------------- judge: verdicts and summary
def parse_choice(reply):
    """Strict: "A" or "B" (either case) once surrounding whitespace and one trailing period are removed,
    else None. "A." -> A, " b " -> B, "C" / "A or B" / "Response A" -> None."""
    s = reply.strip()
    if s.endswith("."):
        s = s[:-1]
    return s.upper() if s in ("A", "B", "a", "b") else None


def pair_verdict(choice_model_as_a, choice_model_as_b):
    """Both orders pick the model: win; both pick the ground truth: loss; they split: tie."""
    if choice_model_as_a is None or choice_model_as_b is None:
        return "invalid"
    model_won = [choice_model_as_a == "A", choice_model_as_b == "B"]
    return "win" if all(model_won) else "loss" if not any(model_won) else "tie"


def wilson_interval(p, n, z=1.96):
    """95% Wilson score interval for a proportion p observed over n trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(verdicts, choices_model_as_a):
    counts = {v: verdicts.count(v) for v in ("win", "loss", "tie", "invalid")}
    n = counts["win"] + counts["loss"] + counts["tie"]
    win_rate = (counts["win"] + 0.5 * counts["tie"]) / n if n else None
    ci = wilson_interval(win_rate, n) if n else (None, None)
    single = [c for c in choices_model_as_a if c is not None]
    return {"win_rate": win_rate, "ci_low": ci[0], "ci_high": ci[1], "wins": counts["win"],
            "losses": counts["loss"], "ties": counts["tie"], "invalid": counts["invalid"], "n": n,
            "single_order_win_rate": single.count("A") / len(single) if single else None}


def judge(args):
    """Win rate of the generations against their references, both orders, from cache where possible."""
    rows = read_jsonl(args.generations)
    template = JUDGE_TEMPLATES[args.task]
    prompts = []
    for r in rows:
        prompts.append(template.format(r["prompt"], r["generation"], r["reference"]))  # model is A
        prompts.append(template.format(r["prompt"], r["reference"], r["generation"]))  # model is B
    cache_path = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")
    replies = ask_all(prompts, cache_path, args, api_key_from_env(args.api_key_env), args.max_tokens)
    choices = [parse_choice(r) for r in replies]
    records = []
    for i, r in enumerate(rows):
        records.append({"id": r["id"], "verdict": pair_verdict(choices[2 * i], choices[2 * i + 1]),
                        "reply_model_as_a": replies[2 * i], "reply_model_as_b": replies[2 * i + 1]})
    write_jsonl_atomic(args.out, records)
    summary = summarize([r["verdict"] for r in records], choices[0::2])
    summary.update(generations=args.generations, config=rows[0].get("config") if rows else None)
    write_atomic(args.out + ".summary.json", json.dumps(summary))
    print(json.dumps(summary), flush=True)
    return summary


def dpo_negatives(args):
    """The paper's DPO baseline: one unhelpful response per training example, written by the LLM."""
    if args.examples:
        rows = read_jsonl(args.examples)
    else:  # the task's own examples, so the ids are the ones train.py's dpo objective looks up
        import data
        import model as modeling
        tok = modeling.load_tokenizer(args.tokenizer)
        rows = [vars(e) for e in data.load_task(args.task, args.split, tok, args.max_len)]
    prompts = [DPO_NEGATIVE_TEMPLATE.format(r["prompt"], r["response"]) for r in rows]
    cache_path = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "judge_cache.jsonl")
    replies = ask_all(prompts, cache_path, args, api_key_from_env(args.api_key_env), args.max_tokens)
    out = [{"id": r["id"], "rejected": reply.strip()} for r, reply in zip(rows, replies)]
    empty = sum(not o["rejected"] for o in out)
    write_jsonl_atomic(args.out, [o for o in out if o["rejected"]])
    log(f"dpo-negatives: wrote {len(out) - empty} rejected responses to {args.out}"
        + (f", dropped {empty} empty replies" if empty else ""))


# ----------------------------------------------------------------------------- MAUVE
def compute_mauve(p_features, q_features, num_buckets="auto", pca_max_data=-1, kmeans_explained_var=0.9,
                  kmeans_num_redo=5, kmeans_max_iter=500, divergence_curve_discretization_size=25,
                  mauve_scaling_factor=5, seed=25):
    """MAUVE between feature sets p (n_p, d) and q (n_q, d), as mauve-text 0.4.0 computes it. -> float"""
    p, q = np.asarray(p_features, np.float64), np.asarray(q_features, np.float64)
    if num_buckets == "auto":  # the reference's heuristic: about 10 points per cluster
        num_buckets = max(2, int(round(min(len(p), len(q)) / 10)))
    elif not isinstance(num_buckets, int):
        raise ValueError('num_buckets must be an integer or "auto"')
    p_hist, q_hist = quantize(p, q, num_buckets, pca_max_data, kmeans_explained_var, kmeans_num_redo,
                              kmeans_max_iter, seed)
    return mauve_from_histograms(p_hist, q_hist, divergence_curve_discretization_size, mauve_scaling_factor)


def quantize(p, q, k, pca_max_data, explained_var, num_redo, max_iter, seed):
    """Cluster p and q jointly; each set's histogram over the k clusters -> (k,), (k,)."""
    data = np.vstack([q, p])  # (n_q + n_p, d), q first as in the reference
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-300)  # L2 rows; zero rows stay 0
    fit = data
    if 0 < pca_max_data < len(data):
        fit = data[np.random.RandomState(seed + 5).choice(len(data), pca_max_data, replace=False)]
    axes = pca_axes(fit, explained_var)  # (d, m)
    x = ((data - fit.mean(0)) @ axes).astype(np.float32)  # (n, m); float32 like faiss: half the GEMM time
    labels = kmeans(x, k, num_redo, max_iter, seed)
    q_hist = np.bincount(labels[:len(q)], minlength=k) / len(q)
    p_hist = np.bincount(labels[len(q):], minlength=k) / len(p)
    return p_hist, q_hist


def pca_axes(x, explained_var):
    """Principal axes (d, m) of x (n, d): the fewest explaining `explained_var` of the variance
    (sklearn's PCA with the reference's argmax rule), from the smaller of the two Gram matrices."""
    xc = x - x.mean(0)
    n, d = xc.shape
    small = xc.T @ xc if n >= d else xc @ xc.T  # (d, d) or (n, n): same nonzero eigenvalues
    var, vecs = np.linalg.eigh(small)  # ascending
    var, vecs = var[::-1].clip(min=0), vecs[:, ::-1]
    if var.sum() == 0:  # every row the same point: nothing to explain, one (arbitrary) axis
        return np.eye(d, 1)
    m = int(np.argmax(np.cumsum(var) / var.sum() >= explained_var)) + 1
    if n >= d:
        return vecs[:, :m]
    return xc.T @ vecs[:, :m] / np.sqrt(var[:m])  # right singular vectors from the left ones


def kmeans(x, k, num_redo=5, max_iter=500, seed=25):
    """Lloyd's k-means on x (n, m) float32, best of num_redo runs by the objective -> labels (n,).
    Started like faiss (the reference's backend): k distinct rows drawn at random. A run stops when no
    assignment changes: that is a fixed point, so it equals faiss running all max_iter iterations.
    An emptied cluster is moved onto the point farthest from its centroid (faiss splits a big one)."""
    n = len(x)
    if k > n:
        raise ValueError(f"{k} clusters for {n} points")
    rng = np.random.default_rng(seed + 2)
    x_sq = np.einsum("ij,ij->i", x, x)  # (n,)
    best_obj, best_labels = np.inf, None
    for _ in range(num_redo):
        centroids = x[rng.choice(n, size=k, replace=False)]  # (k, m)
        labels, dist = assign(x, x_sq, centroids)
        for _ in range(max_iter):
            centroids = update_centroids(x, labels, dist, k)
            new_labels, dist = assign(x, x_sq, centroids)
            if np.array_equal(new_labels, labels):
                break
            labels = new_labels
        if dist.sum() < best_obj:
            best_obj, best_labels = dist.sum(), labels
    return best_labels


def assign(x, x_sq, centroids, chunk=1 << 24):
    """Nearest centroid of every row -> labels (n,), squared distances (n,).
    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one GEMM per chunk of rows, the (n, k) matrix never whole."""
    c_sq = np.einsum("ij,ij->i", centroids, centroids)  # (k,)
    rows = max(1, chunk // len(centroids))
    labels, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for s in range(0, len(x), rows):
        d = x[s:s + rows] @ centroids.T  # (rows, k)
        d *= -2
        d += c_sq  # ||x||^2 left out: the same argmin, added back below
        labels[s:s + rows] = d.argmin(1)
        dist[s:s + rows] = np.take_along_axis(d, labels[s:s + rows, None], 1)[:, 0]
    dist += x_sq
    return labels, np.maximum(dist, 0)


def update_centroids(x, labels, dist, k):
    """Mean of each cluster's rows (a sparse one-hot (k, n) @ x), empty clusters re-seeded far away."""
    n = len(x)
    onehot = scipy.sparse.csr_matrix((np.ones(n, np.float32), (labels, np.arange(n))), shape=(k, n))
    counts = np.bincount(labels, minlength=k)  # (k,)
    centroids = np.asarray(onehot @ x) / np.maximum(counts, 1)[:, None].astype(np.float32)  # (k, m)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        centroids[empty] = x[np.argsort(-dist)[:len(empty)]]
    return centroids


def mauve_from_histograms(p_hist, q_hist, size=25, scaling=5):
    return mauve_area(divergence_curve(np.asarray(p_hist, np.float64), np.asarray(q_hist, np.float64), size, scaling))


def kl_rows(a, r):
    """KL(a || r_i) for each row r_i of r: (k,), (m, k) -> (m,). Terms with a = 0 are 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(a / r), 0.0).sum(1)


def divergence_curve(p, q, size=25, scaling=5):
    """The points (exp(-c KL(q|r)), exp(-c KL(p|r))) for r = w p + (1 - w) q, w on the reference's grid
    of `size` weights in (0, 1), in increasing w, between the end points (1, 0) (w = 0) and (0, 1) (w = 1).
    -> (size + 2, 2)"""
    w = np.linspace(1e-6, 1 - 1e-6, size)[:, None]  # (size, 1)
    r = w * p + (1 - w) * q  # (size, k), > 0 wherever p or q is
    inner = np.exp(-scaling * np.stack([kl_rows(q, r), kl_rows(p, r)], 1))  # (size, 2)
    return np.vstack([[1.0, 0.0], inner, [0.0, 1.0]])


def mauve_area(curve):
    """Area under the divergence curve, as the reference's mean of its areas w.r.t. x and w.r.t. y, but
    with trapezoids taken along the curve (increasing w: x falls, y rises) instead of after sorting by x.
    On a monotone curve that is the same polygon; with exact ties (p == q puts every inner point at
    (1, 1)) sorting may visit (1, 0) after (1, 1) and cut the corner, giving 0.5 for identical inputs."""
    x, y = curve[:, 0], curve[:, 1]
    area_x = -np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)  # x decreases along the curve
    area_y = np.sum(np.diff(y) * (x[1:] + x[:-1]) / 2)
    return float(0.5 * (area_x + area_y))


def featurize(texts, model_dir, batch_size=16, max_len=1024, device="cpu"):
    """MAUVE features: the final-layer (final-normed) hidden state at each text's last token -> (n, C).
    Texts are batched by length and right-padded; under causal attention the padding cannot reach the
    last real token, so its state is the unpadded one."""
    import torch
    import model as modeling
    net, tok = modeling.load(model_dir, device=device)
    net.eval()
    max_len = min(max_len, net.config.max_seq_len)
    bos = [tok.bos_id] if tok.bos_id is not None else []  # as an HF tokenizer would encode a whole text
    ids = [(bos + tok.encode(t))[:max_len] or [tok.eos_id] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    feats = np.zeros((len(ids), net.config.n_embd), np.float32)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            lengths = torch.tensor([len(ids[i]) for i in batch])
            idx = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long)
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
        p_texts = [r[args.p_field] for r in read_jsonl(args.p_text)]
        q_texts = [r[args.q_field] for r in read_jsonl(args.q_text)]
        feats = featurize(p_texts + q_texts, args.featurizer, args.batch_size, args.max_len, args.device)
        p, q = feats[:len(p_texts)], feats[len(p_texts):]
    else:
        sys.exit("mauve: give --p and --q (.npy features), or --p-text, --q-text and --featurizer")
    buckets = args.num_buckets if args.num_buckets == "auto" else int(args.num_buckets)
    score = compute_mauve(p, q, num_buckets=buckets, kmeans_num_redo=args.kmeans_num_redo,
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
            with open(m["p"]) as f:
                config = json.loads(f.readline()).get("config")
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
    plot_alpha_sweep(rows, os.path.join(args.run_dir, "win_rate_vs_alpha.png"))
    return table


def plot_alpha_sweep(rows, path):
    """Win rate against alpha per method, if matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    curves = {}
    for (method, alpha, decoding), r in rows.items():
        if alpha is not None and r.get("judge") and r["judge"]["win_rate"] is not None:
            curves.setdefault(f"{method} {decoding}", []).append((alpha, r["judge"]["win_rate"]))
    if not curves:
        return
    for label, points in sorted(curves.items()):
        plt.plot(*zip(*sorted(points)), marker="o", label=label)
    plt.xlabel("alpha (weight of the MLE model)")
    plt.ylabel("win rate vs ground truth")
    plt.legend()
    plt.savefig(path, dpi=120)
    plt.close()
    log(f"report: plot in {path}")


# ----------------------------------------------------------------------------- the method in miniature
# `python evaluate.py miniature`: every method of the paper on the synthetic task, on a CPU, over seeds.
# Layout under --out: seed<S>/<stage>/ (train.py's run folder; final/ the model, scores.json its held-out
# scores, log.txt its output), seed<S>/an/ (the AN cache), seed<S>/dpo_rejected.jsonl, seed<S>/alpha/alpha_<a>/
# (the ensembles, their scores in seed<S>/alpha/scores_<run>@<a>.json),
# results.md and alpha.md. A run with a final/ is not trained again and a model with scores.json is not
# scored again, so a rerun after an interruption continues where it stopped.

def miniature_settings(path, scale):
    """config/miniature.py -> (base config, {stage: overrides}, experiment settings), --scale applied."""
    import runpy
    import train
    base, stages = train.load_preset(path)
    ns = runpy.run_path(path)
    experiment = dict(ns["experiment"])
    if scale == "tiny":
        tiny = ns["tiny"]
        base = {**base, **tiny["config"]}
        stages = {name: {**o, **(tiny["ref"] if name == "ref" else tiny["continued"])} for name, o in stages.items()}
        experiment.update(tiny["experiment"])
    return base, stages, experiment


def miniature_examples(base, seed, n_eval):
    """The held-out prompts every model of a seed is scored on (the first n_eval test examples)."""
    import data
    import model as modeling
    return data.load_task(base["task"], "test", modeling.byte_tokenizer(), base["max_len"], n=n_eval, seed=seed)


def miniature_score(model_dir, ref_dir, examples, out_path):
    """Greedy decoding on the held-out prompts -> the exact metrics (data.score_synthetic) and MAUVE between
    the generated and the ground-truth continuations, featurized (prompt + continuation, the last token's
    final hidden state) by the seed's reference model: the cheap stand-in for gpt2-large's features.
    out_path (beside the model, never inside it: interpolate copies a model folder's files) caches the result."""
    import data
    import model as modeling
    if os.path.isfile(out_path):
        with open(out_path) as f:
            return json.load(f)
    net, tok = modeling.load(model_dir)
    net.eval()
    greedy = dict(temperature=0.0, top_k=None, top_p=None, num_beams=1, length_penalty=1.0)
    gens = []
    for s in range(0, len(examples), 64):
        gens += generate_batch(net, tok, [e.prompt_ids for e in examples[s:s + 64]], data.SYNTHETIC_MAX_NEW_TOKENS, greedy)
    scores = data.score_synthetic(gens, [e.continuation_ids for e in examples], tok.eos_id)
    texts = [e.prompt + new_text(tok, g) for e, g in zip(examples, gens)] + [e.prompt + e.response for e in examples]
    feats = featurize(texts, ref_dir, batch_size=128)
    scores["mauve"] = compute_mauve(feats[:len(examples)], feats[len(examples):])
    write_atomic(out_path, json.dumps(scores))
    return scores


def miniature_task(kind, seed, name, args, base, stages, experiment, threads):
    """One unit of work, run in a worker process with its output in <run>/log.txt:
    kind "ref": train the reference, then write the seed's AN cache and DPO rejected answers;
    kind "run": train one continued stage; kind "alpha": build one weight-space ensemble.
    Each then scores its model. Returns (seed, name, scores, seconds)."""
    from dataclasses import replace
    import torch
    import data
    import negatives
    import train
    torch.set_num_threads(threads)
    t0 = time.time()
    seed_dir = os.path.join(args.out, f"seed{seed}")
    ref_final = os.path.join(seed_dir, "ref", "final")
    run_dir = os.path.join(seed_dir, "alpha" if kind == "alpha" else name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"log{'_' + name if kind == 'alpha' else ''}.txt"), "a") as logf, \
            contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
        if kind == "alpha":
            best, alpha = name.split("@")
            final = interpolate_folder(os.path.join(seed_dir, "mle", "final"), os.path.join(seed_dir, best, "final"),
                                       float(alpha), os.path.join(run_dir, f"alpha_{float(alpha):g}"))
        else:
            cfg = train.Config(**{"resume": True, **base, **stages[name], "seed": seed, "out_dir": run_dir})
            if name != "ref":
                n = cfg.n_train
                cfg = replace(cfg, init_from=ref_final,
                              an_cache=os.path.join(seed_dir, "an") if "an:" in cfg.negatives and cfg.objective == "cpo" else "",
                              dpo_rejected=os.path.join(seed_dir, "dpo_rejected.jsonl") if cfg.objective == "dpo" else "")
            final = os.path.join(run_dir, "final")
            if not os.path.isdir(final):
                final = train.train(cfg)
            if name == "ref":  # the seed's shared inputs of the AN and DPO runs, for their training examples
                cont = next(iter(o for k, o in stages.items() if k != "ref"))
                n, spec = cont["n_train"], next(o["negatives"] for o in stages.values() if o.get("negatives", "").startswith("an:"))
                negatives.main(["--model", final, "--data", base["task"], "--split", "train", "--spec", spec,
                                "--out", os.path.join(seed_dir, "an"), "--seed", str(seed), "--limit", str(n),
                                "--max-len", str(base["max_len"]), "--max-new-tokens", str(data.SYNTHETIC_MAX_NEW_TOKENS),
                                "--device", "cpu"])
                examples = data.load_task(base["task"], "train", load_tokenizer_only(final), base["max_len"], n=n, seed=seed)
                write_jsonl_atomic(os.path.join(seed_dir, "dpo_rejected.jsonl"),
                                   [{"id": e.id, "rejected": data.synthetic_rejected(e)} for e in examples])
        scores = miniature_score(final, ref_final, miniature_examples(base, seed, experiment["n_eval"]),
                                 os.path.join(run_dir, f"scores_{name}.json" if kind == "alpha" else "scores.json"))
    return seed, name, scores, time.time() - t0


def load_tokenizer_only(folder):
    import model as modeling
    return modeling.load(folder)[1]


def mean_spread(values):
    """(mean, sample standard deviation over seeds; 0 for one seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdict(values, baseline):
    """win / loss only when the difference of the means exceeds the larger of the two seed-to-seed standard
    deviations; anything smaller is a tie. With one seed there is no spread: every difference is '?'."""
    (m, s), (mb, sb) = mean_spread(values), mean_spread(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return "?"
    if abs(m - mb) <= max(s, sb):
        return "tie"
    return "win" if m > mb else "loss"


METRICS = ("exact_match", "correct_stop", "token_accuracy", "mauve")


def results_table(results, names, seeds):
    """Markdown: one row per method, each metric as mean ± std over seeds, and the verdict against MLE
    continued on exact match and on MAUVE."""
    lines = ["| method | " + " | ".join(METRICS) + " | exact match vs MLE | MAUVE vs MLE |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    for name in names:
        vs = ["-", "-"] if name in ("mle", "ref") else [
            verdict([results[(s, name)][k] for s in seeds], [results[(s, "mle")][k] for s in seeds])
            for k in ("exact_match", "mauve")]
        lines.append(f"| {name} | " + " | ".join(spread_cells(results, name, seeds) + vs) + " |")
    return "\n".join(lines)


def alpha_table(results, best, alphas, seeds):
    """Markdown: the alpha sweep of the best CPO variant, one row per alpha, then MLE continued (alpha 1)."""
    lines = ["| alpha (weight of MLE) | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for label, name in [(f"{a:g}", f"{best}@{a:g}") for a in alphas] + [("1 (MLE continued)", "mle")]:
        lines.append(f"| {label} | " + " | ".join(spread_cells(results, name, seeds)) + " |")
    return "\n".join(lines)


def spread_cells(results, name, seeds):
    """One run name's metrics as 'mean ± std' over seeds, in METRICS order."""
    return [f"{m:.3f} ± {sd:.3f}" for m, sd in (mean_spread([results[(s, name)][k] for s in seeds]) for k in METRICS)]


def miniature(args):
    """Train, score and tabulate; see config/miniature.py for the sizes and the module's end for the layout."""
    base, stages, experiment = miniature_settings(args.config, args.scale)
    seeds = [int(s) for s in (args.seeds or experiment["seeds"]).split(",")]
    jobs = args.jobs or experiment["jobs"]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    alphas = [float(a) for a in experiment["alphas"].split(",")]
    continued = [n for n in stages if n != "ref"]
    cpo_runs = [n for n in continued if stages[n].get("objective") == "cpo"]
    common = (args, base, stages, experiment, threads)
    total = len(seeds) * (1 + len(continued) + len(alphas))
    results, t0 = {}, time.time()
    log(f"miniature: seeds {seeds}, {len(continued)} continued runs each from the seed's reference, "
        f"{jobs} at a time x {threads} thread(s); logs in {args.out}/seed<S>/<run>/log.txt")

    def collect(future):
        seed, name, scores, secs = future.result()
        results[(seed, name)] = scores
        done = len(results)
        eta = (time.time() - t0) / done * (total - done)
        log(f"[{done}/{total}] seed {seed} {name}: exact match {scores['exact_match']:.3f}, correct stop "
            f"{scores['correct_stop']:.3f}, MAUVE {scores['mauve']:.3f} ({secs:.0f}s; elapsed "
            f"{(time.time() - t0) / 60:.1f} min, ETA at this pace {eta / 60:.1f} min)")
        return seed, name

    if jobs == 1:  # in this process: easier to debug, and what the test runs
        from concurrent.futures import Future

        def submit(*a):
            f = Future()
            f.set_result(miniature_task(*a))
            return f
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        submit = lambda *a: pool.submit(miniature_task, *a)
    try:
        from concurrent.futures import FIRST_COMPLETED, wait
        pending = {submit("ref", s, "ref", *common) for s in seeds}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                seed, name = collect(f)
                if name == "ref":  # the seed's continued runs can start
                    pending |= {submit("run", seed, n, *common) for n in continued}
        best = max(cpo_runs, key=lambda n: np.mean([results[(s, n)]["exact_match"] for s in seeds]))
        log(f"miniature: best CPO variant by mean exact match: {best}; alpha sweep {alphas}")
        pending = {submit("alpha", s, f"{best}@{a:g}", *common) for s in seeds for a in alphas}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                collect(f)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    cont = stages[continued[0]]
    header = (f"Synthetic task, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); reference: MLE from scratch, "
              f"{stages['ref']['steps']} steps of batch {stages['ref']['batch_size']}; every other row continues from it "
              f"for {cont['steps']} steps of batch {cont['batch_size']} (lr {cont['lr']:g}). Greedy decoding on "
              f"{experiment['n_eval']} held-out prompts. Cells: mean ± standard deviation over seeds. "
              f"win/loss: the difference of means exceeds the larger of the two standard deviations; else tie.")
    table = results_table(results, ["ref"] + continued, seeds)
    alphas_md = alpha_table(results, best, alphas, seeds)
    alpha_header = f"Weight-space ensemble alpha * MLE + (1 - alpha) * {best} (the best CPO variant by mean exact match), per seed."
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "results.md"), header + "\n\n" + table + "\n")
    write_atomic(os.path.join(args.out, "alpha.md"), alpha_header + "\n\n" + alphas_md + "\n")
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps({f"{s}/{n}": r for (s, n), r in results.items()}, indent=1))
    plot_miniature_alpha(results, best, alphas, seeds, os.path.join(args.out, "alpha.png"))
    print(header + "\n\n" + table + "\n\n" + alpha_header + "\n\n" + alphas_md, flush=True)
    log(f"miniature: done in {(time.time() - t0) / 60:.1f} min; {args.out}/results.md, {args.out}/alpha.md")
    return table, alphas_md


def plot_miniature_alpha(results, best, alphas, seeds, path):
    """Exact match against alpha, mean and std over seeds, if matplotlib is installed (not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    stats = [mean_spread([results[(s, f"{best}@{a:g}")]["exact_match"] for s in seeds]) for a in alphas]
    plt.errorbar(alphas, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", capsize=3)
    plt.xlabel("alpha (weight of the MLE model)")
    plt.ylabel("exact match, held-out")
    plt.title(f"alpha * MLE + (1 - alpha) * {best}")
    plt.savefig(path, dpi=120)
    plt.close()


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
    sp.add_argument("--workers", type=int, default=8, help="concurrent requests")
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds before one request is abandoned and retried")
    sp.add_argument("--max-retries", type=int, default=8, help="retries per request before the run stops")
    sp.add_argument("--backoff", type=float, default=1.0,
                    help="first retry delay in seconds; doubles each retry, jittered x0.5-1.5, capped at 60s")
    sp.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the judge")
    sp.add_argument("--max-tokens", type=int, default=max_tokens, help="reply length limit")


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
    sp.add_argument("--n", type=int, default=1000, help="prompts, a seeded choice among the split (0: all)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the choice of prompts and of sampling")
    sp.add_argument("--out", required=True, help="jsonl to append to; ids already there are skipped")
    sp.add_argument("--max-len", type=int, default=1024, help="data.py's max_len: prompt + reference tokens")
    sp.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit")
    sp.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    sp.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    sp.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of mass p (nucleus)")
    sp.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (sampling flags ignored)")
    sp.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob sum / length ** this")
    sp.add_argument("--device", default="cpu", help="e.g. cuda")
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
    sp.add_argument("--task", required=True, choices=sorted(JUDGE_TEMPLATES), help="which paper template to use")
    add_client_flags(sp, max_tokens=5)
    sp.set_defaults(func=judge)

    sp = command("dpo-negatives", "unhelpful responses for the DPO baseline, written by an LLM")
    sp.add_argument("--examples", help='jsonl of {"id", "prompt", "response"}; or instead:')
    sp.add_argument("--task", help="a data.py task (dolly, wiki:<src>, jsonl:<src>, synthetic) whose --split is used")
    sp.add_argument("--split", default="train", help="split of --task")
    sp.add_argument("--tokenizer", help="folder with the tokenizer files of the model to train (data.py drops "
                    "examples by token length, so ids match train.py's)")
    sp.add_argument("--max-len", type=int, default=1024, help="train.py's max_len, for the same examples")
    add_client_flags(sp, max_tokens=256)
    sp.set_defaults(func=dpo_negatives)

    sp = command("mauve", "MAUVE between two feature sets (or texts featurized by a model)")
    sp.add_argument("--p", help=".npy (n_p, d) features of the model's text")
    sp.add_argument("--q", help=".npy (n_q, d) features of the human text")
    sp.add_argument("--p-text", help="jsonl whose --p-field is featurized (default field: generation)")
    sp.add_argument("--q-text", help="jsonl whose --q-field is featurized (default field: reference)")
    sp.add_argument("--p-field", default="generation", help="text field of --p-text")
    sp.add_argument("--q-field", default="reference", help="text field of --q-text")
    sp.add_argument("--featurizer", help="model folder or hub name for features (the reference uses gpt2-large)")
    sp.add_argument("--batch-size", type=int, default=16, help="texts per featurizer forward pass")
    sp.add_argument("--max-len", type=int, default=1024, help="tokens kept from the start of each text")
    sp.add_argument("--device", default="cpu", help="featurizer device, e.g. cuda")
    sp.add_argument("--num-buckets", default="auto", help='k-means clusters, or "auto" = max(2, min(n_p, n_q) / 10)')
    sp.add_argument("--kmeans-num-redo", type=int, default=5, help="k-means restarts; the best objective is kept")
    sp.add_argument("--kmeans-max-iter", type=int, default=500, help="k-means iteration limit per restart")
    sp.add_argument("--seed", type=int, default=25, help="seed of PCA subsampling and k-means initialisation")
    sp.add_argument("--out", default=None, help="also write the JSON result here (report reads *.mauve.json)")
    sp.set_defaults(func=mauve_cmd)

    sp = command("report", "markdown table (and PNG if matplotlib is installed) of a run folder")
    sp.add_argument("run_dir", help="folder searched for *.summary.json (judge) and *.mauve.json (mauve --out)")
    sp.set_defaults(func=report)

    sp = command("miniature", "every method of the paper on the synthetic task over seeds, on a CPU: results table")
    sp.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "miniature.py"),
                    help="the experiment's preset")
    sp.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's, 0,1,2)")
    sp.add_argument("--out", default="out/miniature", help="folder of every run, the tables and the logs")
    sp.add_argument("--scale", default="full", choices=["full", "tiny"], help="tiny: a smoke test of a few steps")
    sp.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's, 2)")
    sp.set_defaults(func=miniature)

    args = parser.parse_args(argv)
    if args.command == "dpo-negatives" and not (args.examples or (args.task and args.tokenizer)):
        parser.error("dpo-negatives needs --examples, or --task and --tokenizer")
    try:
        return args.func(args)
    except JudgeError as e:
        sys.exit(f"{args.command}: {e}")


if __name__ == "__main__":
    main()
