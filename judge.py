"""
The LLM judge of the paper: win rate against the ground truth, asked of any OpenAI-compatible chat API.
Standard library and `requests` only, so this file can be copied into another project on its own.

    import judge
    rows = [{"id": "1", "prompt": "Name a colour.", "reference": "Blue.", "generation": "Red."}]
    client = dict(url="https://api.openai.com/v1", model="gpt-3.5-turbo",
                  api_key=judge.api_key_from_env("OPENAI_API_KEY"))
    records, summary = judge.judge_generations(rows, "dolly", "judge_cache.jsonl", **client)
    summary["win_rate"], summary["ci_low"], summary["ci_high"]
    rejected = judge.dpo_rejected([{"id": "1", "prompt": "...", "response": "..."}], "judge_cache.jsonl",
                                  **client, max_tokens=256)    # the DPO baseline's unhelpful answers

(`python evaluate.py judge` and `evaluate.py dpo-negatives` do the same from files.)

The query. A row's "prompt" is what the judge is shown as the Query (or Prefix, or Instruction), unless
the row also has a "query", which is then shown instead. The paper asks about the question as a person
would put it to a chatbot: for a model trained on a prompt template (nanoCPO's "### Instruction: ...
### Response:"), give the plain instruction (and its context) as "query"; evaluate.py does so with
data.judge_query.

Judging (the paper's templates, verbatim). Every pair is asked in both orders, the model's generation as
A and then as B, against the ground truth. A pair is a win when both answers pick the model, a loss when
both pick the ground truth, a tie when they split (position bias), and invalid when either answer does
not start with one unambiguous choice. parse_choice accepts a lone letter in either case ("A", " b ", "A."),
and the wrappings small instruct models put around it: "(A)", "**A**", "Response A", "Answer: B", and a
choice followed by a colon and an explanation ("Response A: it lists...", "A: ..."); anything else
("A or B", "A. B", "C", "'A'") is invalid, since we never guess. The summary lists the first few invalid
replies, so a judge that answers in another shape is seen at once. win_rate = (wins + ties / 2) / n over
the n valid pairs, with a 95% Wilson score interval for that proportion (each pair treated as a Bernoulli
trial of the same mean: conservative, since a tie varies less than a coin, and never of zero width at 0
or 1). single_order_win_rate is the paper's kind of number: the share of valid answers that pick the
model when it is shown as Response A.

The client. The API key is sent in the Authorization header and scrubbed from every message we print or
raise and from every reply before it is cached or returned (a server may quote our headers back); messages
are scrubbed first and cut after, so no part of the key survives the cut. Timeouts, connection errors,
429, 5xx and malformed bodies are retried with exponential backoff; other HTTP errors fail at once. A
Retry-After is obeyed up to max_backoff (60 s), and every wait ends at once when the run stops (an error
elsewhere, or Ctrl-C: the run ends promptly). Transport failures (after retries) raise JudgeError; the
cache keeps every answer so far. The cache is a jsonl file, append-only:
{"key": sha256(json([judge model, prompt])), "reply": text}. One line is written and flushed per answer,
so a crash loses only the requests in flight; a line torn by a crash is skipped on reading.
"""
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime

import requests

JUDGE_TEMPLATES = {  # verbatim from the paper; filled in order (query, A, B)
    "dolly": ('For the following query to a chatbot, which response is more helpful?\n'
              ' Query: {}\n Response A: {}\n Response B: {}\n'
              ' State only "A" or "B" to indicate which response is more helpful.\n More helpful:'),
    "wiki": ('For the following prefix, which continuation is better?\n'
             ' Prefix: {}\n Continuation A: {}\n Continuation B: {}\n'
             ' State only "A" or "B" to indicate which continuation is more helpful.\n Better:'),
}
DPO_NEGATIVE_TEMPLATE = ('Given the ground truth instruction and response, '
                         'can you generate a not helpful response?\n'
                         ' Instruction: {}\nResponse: {}\nNot helpful response:')


# ----------------------------------------------------------------------------- verdicts and summary
CHOICE = re.compile(r"""
    (?:answer\s*:\s*)?                      # "Answer: B"
    (?:(?:response|continuation)\s*:?\s*)?  # "Response A"
    (\()?([AB])(?(1)\))                     # "A" or "(A)"
    \s*(?:\.|:.*)?                          # then nothing, one period, or a colon and an explanation
    """, re.IGNORECASE | re.DOTALL | re.VERBOSE)


def parse_choice(reply):
    """One unambiguous leading choice -> "A" or "B", else None. Markdown asterisks are dropped first.
    "A", " b ", "A.", "(A)", "**A**", "Response A", "Answer: B", "A: because..." -> the letter;
    "C", "A or B", "A. B", "AB", "'A'", "" -> None."""
    m = CHOICE.fullmatch(reply.replace("*", "").strip())
    return m.group(2).upper() if m else None


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


def check_generation(row, where):
    """A row judge_generations can use (read_jsonl's check): an id and the three texts as strings (and the
    query, when there is one); a null generation would otherwise be judged as the text "None". ValueError
    naming `where`."""
    if not isinstance(row, dict) or "id" not in row:
        raise ValueError(f"{where}: expected an object with an id, got {str(row)[:80]}")
    for field in ("prompt", "reference", "generation", *(("query",) if "query" in row else ())):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{where}: {field!r} must be a string, got {json.dumps(row.get(field))[:80]}")


def query_of(row):
    """What the judge is asked about: the row's "query" when it has one, else its "prompt"."""
    return row.get("query", row["prompt"])


def judge_generations(rows, task, cache_path, **client):
    """Rows {"id", "prompt", "reference", "generation"[, "query"]} -> (one record per row {"id", "verdict",
    "reply_model_as_a", "reply_model_as_b"}, summarize's dict). client: ask_all's keyword arguments."""
    template = JUDGE_TEMPLATES[task]
    prompts = []
    for i, r in enumerate(rows):
        check_generation(r, f"row {i}")
        prompts.append(template.format(query_of(r), r["generation"], r["reference"]))  # model is A
        prompts.append(template.format(query_of(r), r["reference"], r["generation"]))  # model is B
    replies = ask_all(prompts, cache_path, **client)
    choices = [parse_choice(r) for r in replies]
    records = []
    for i, r in enumerate(rows):
        as_a, as_b = 2 * i, 2 * i + 1
        records.append({"id": r["id"], "verdict": pair_verdict(choices[as_a], choices[as_b]),
                        "reply_model_as_a": replies[as_a], "reply_model_as_b": replies[as_b]})
    summary = summarize([r["verdict"] for r in records], choices[0::2])
    summary["invalid_replies"] = first_invalid(replies, choices)
    return records, summary


def first_invalid(replies, choices, n=5, width=200):
    """The first n distinct replies parse_choice refused, each cut to width characters:
    why pairs were invalid."""
    seen = []
    for reply, choice in zip(replies, choices):
        if choice is None and reply[:width] not in seen:
            seen.append(reply[:width])
    return seen[:n]


def dpo_rejected(rows, cache_path, **client):
    """The paper's DPO baseline: rows {"id", "prompt", "response"[, "query"]} -> [{"id", "rejected"}], the
    judge model's unhelpful response to each (asked about query_of(row)), stripped; empty replies are left
    out."""
    prompts = [DPO_NEGATIVE_TEMPLATE.format(query_of(r), r["response"]) for r in rows]
    replies = ask_all(prompts, cache_path, **client)
    return [{"id": r["id"], "rejected": reply.strip()} for r, reply in zip(rows, replies) if reply.strip()]


# ----------------------------------------------------------------------------- the HTTP client
class JudgeError(RuntimeError):
    """The judge could not be reached or refused us; the message never contains the API key."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def scrub(text, secret):
    return str(text).replace(secret, "***") if secret else str(text)


def api_key_from_env(name):
    key = os.environ.get(name, "")
    if not key:
        log(f"judge: ${name} is empty; sending no Authorization header "
            "(fine for a local vLLM/llama.cpp server)")
    return key


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
        seconds = float(value)  # "1e999" is inf: capped by the caller like any long wait
        return None if math.isnan(seconds) else max(0.0, seconds)
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def pause(seconds, stop):
    """Wait seconds, or less if stop is set meanwhile (Ctrl-C, or a failure elsewhere): True if stopped.
    An Event, not time.sleep, so an interrupted run's worker threads end at once and Python can exit."""
    return stop.wait(seconds)


def check_client_settings(workers=1, timeout=60.0, max_retries=8, backoff=1.0, max_backoff=60.0, **_):
    """ValueError naming the setting, before any request is sent."""
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not (isinstance(max_retries, int) and max_retries >= 0):
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def chat_completion(prompt, url, model, api_key="", max_tokens=5, temperature=0.0, timeout=60.0,
                    max_retries=8, backoff=1.0, max_backoff=60.0, stop=None):
    """One user prompt -> the reply text, from any OpenAI-compatible POST {url}/chat/completions.
    Timeouts, connection errors, 429, 5xx and malformed bodies are retried with exponential backoff and
    jitter (or after Retry-After when the server sends one); other HTTP errors (bad key, bad request)
    fail at once, since repeating them cannot help. Raises JudgeError, with the key scrubbed. Setting the
    `stop` event makes it give up before its next attempt (the run failed elsewhere)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": temperature, "max_tokens": max_tokens}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    check_client_settings(timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
    stop = stop or threading.Event()
    for attempt in range(max_retries + 1):
        if stop.is_set():
            raise JudgeError("stopped: the run failed on another request or was interrupted")
        wait = None
        try:
            r = http_session().post(url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                                    timeout=timeout)
            if r.status_code == 429 or r.status_code >= 500:
                problem, wait = f"HTTP {r.status_code}", parse_retry_after(r.headers.get("Retry-After"))
            elif r.status_code != 200:
                message = scrub(f"HTTP {r.status_code} from {url}: {r.text}", api_key)
                raise JudgeError(message[:300])  # scrub, then cut
            else:
                try:
                    reply = r.json()["choices"][0]["message"]["content"]
                    if isinstance(reply, str):
                        return scrub(reply, api_key)  # a server that quotes our headers: never cache the key
                except (ValueError, KeyError, IndexError, TypeError):
                    pass
                problem = "malformed response body"
        except (requests.Timeout, requests.ConnectionError) as e:
            problem = scrub(f"{type(e).__name__}: {e}", api_key)[:300]
        except requests.RequestException as e:
            # e.g. a key with a newline: the message would quote the header
            raise JudgeError(scrub(f"request to {url} failed: {type(e).__name__}: {e}", api_key)) from None
        if attempt == max_retries or stop.is_set():
            break
        if wait is None:
            wait = backoff * 2 ** attempt * random.uniform(0.5, 1.5)  # jitter: no thundering herd
        wait = min(max_backoff, wait)  # a Retry-After of an hour (or 1e999) too
        log(f"judge: {problem}; retry {attempt + 1}/{max_retries} in {wait:.2f}s")
        if pause(wait, stop):
            raise JudgeError("stopped: the run failed on another request or was interrupted")
    raise JudgeError(f"giving up on a request after {max_retries + 1} attempts, last: {problem}")


# ----------------------------------------------------------------------------- the reply cache
def cache_key(model, prompt):
    return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()


def load_cache(path):
    """{key: reply} from an append-only cache file; a line torn by a crash mid-write is skipped."""
    cache = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    cache[rec["key"]] = rec["reply"]
                except (ValueError, KeyError, TypeError):
                    continue
    return cache


def ask_all(prompts, cache_path, url, model, api_key="", workers=8, **request):
    """Replies to all prompts, in order. Only the prompts missing from the cache are sent (each distinct
    prompt once), `workers` at a time; every reply is appended to the cache and flushed as it arrives.
    request: chat_completion's keyword arguments (max_tokens, temperature, timeout, max_retries, backoff)."""
    check_client_settings(workers, **request)
    keys = [cache_key(model, p) for p in prompts]
    cache = {k: scrub(v, api_key) for k, v in load_cache(cache_path).items()}  # a cache from before scrubbing
    todo = {k: p for k, p in zip(keys, prompts) if k not in cache}
    log(f"judge: {len(prompts)} prompts, {len(prompts) - len(todo)} answered in {cache_path}, "
        f"sending {len(todo)}")
    if not todo:
        return [cache[k] for k in keys]
    stop = threading.Event()
    t0 = time.time()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with open(cache_path, "a+b") as f:  # appends go to the end whatever we read
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # a line torn by a crash: end it (load_cache skips it) before appending
            futures = {pool.submit(chat_completion, p, url, model, api_key, stop=stop, **request): k
                       for k, p in todo.items()}
            for done, future in enumerate(as_completed(futures), 1):
                key = futures[future]
                cache[key] = future.result()
                f.write(json.dumps({"key": key, "reply": cache[key]}).encode() + b"\n")
                f.flush()
                if done % 50 == 0 or done == len(todo):
                    eta = (time.time() - t0) / done * (len(todo) - done)
                    log(f"judge: {done}/{len(todo)} answered, ETA {eta:.0f}s")
    except KeyboardInterrupt:
        log(f"judge: interrupted; {len(cache)} answers kept in {cache_path}, a rerun sends only the rest")
        raise
    finally:  # on an error or Ctrl-C: drop the queued requests, and retry none of those in flight
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return [cache[k] for k in keys]
