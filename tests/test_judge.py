"""judge.py against a scripted local HTTP server: retries, the reply cache, the key kept secret; through
evaluate.py's judge and dpo-negatives commands, and from code."""
import ast
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import evaluate
import judge
import tokenizer
from common import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-5ecret-9f3c2a71"
KEY_ENV = "NANOCPO_TEST_JUDGE_KEY"


# ----------------------------------------------------------------------------- a scripted judge server
class ScriptedJudge:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 (ephemeral port). Each prompt is recognised
    by its example and order; its script is a list of actions used one per request, the last repeating:
    ("ok", text), ("429", retry_after), ("500",), ("slow", seconds, text), ("badjson",), ("401",)."""

    def __init__(self, script=None, default=("ok", "A")):
        self.script, self.default = script or {}, default
        self.counts, self.auth, self.arrived = {}, set(), 0
        self.block_after, self.gate = None, threading.Event()  # hang every request after the first N
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.handle(self, body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # the client hung up on a slow reply: expected
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, h, body):
        prompt = body["messages"][-1]["content"]
        with self.lock:
            n = self.counts.get(prompt, 0)
            self.counts[prompt] = n + 1
            self.arrived += 1
            self.auth.add(h.headers.get("Authorization"))
            blocked = self.block_after is not None and self.arrived > self.block_after
        if blocked:
            self.gate.wait(60)
        actions = self.script.get(which(prompt), [self.default])
        action = actions[min(n, len(actions) - 1)]
        if action[0] == "429":
            self.send(h, 429, b'{"error": "slow down"}', {"Retry-After": action[1]})
        elif action[0] == "500":  # a careless server echoing the credentials back
            self.send(h, 500, f"internal error for {h.headers.get('Authorization')}".encode())
        elif action[0] == "401":
            auth = h.headers.get("Authorization")
            self.send(h, 401, f'{{"error": "Incorrect API key provided: {auth}"}}'.encode())
        elif action[0] == "badjson":
            self.send(h, 200, b'{"choices": [{"message": {"content": "A"')
        else:
            if action[0] == "slow":
                threading.Event().wait(action[1])
            reply = {"choices": [{"message": {"role": "assistant", "content": action[-1]}}]}
            self.send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def send(h, status, payload, headers=()):
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in dict(headers).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def total(self):
        return sum(self.counts.values())

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def which(prompt):
    """(example index, "model_as_a" | "model_as_b") from a judge prompt built on write_generations' rows."""
    for line in prompt.split("\n"):
        if line.startswith((" Response A: gen-", " Response A: ref-", " Instruction: q-")):
            i = int(line.rsplit("-", 1)[1])
            return i, "model_as_b" if "ref-" in line else "model_as_a"
    raise AssertionError(f"unrecognised prompt {prompt!r}")


def write_generations(path, n):
    rows = [{"id": f"ex{i}", "prompt": f"q-{i}", "reference": f"ref-{i}", "generation": f"gen-{i}",
             "config": {"model": "tiny", "decoding": "greedy"}} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def judge_argv(gens, out, url, workers=4):
    return ["judge", "--generations", str(gens), "--task", "dolly",
            "--judge-url", url, "--judge-model", "judge-x",
            "--out", str(out), "--api-key-env", KEY_ENV, "--workers", str(workers), "--timeout", "1.5",
            "--backoff", "0.001", "--max-retries", "3"]


def assert_key_nowhere(tmp_path, *texts):
    for text in texts:
        assert KEY not in text
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert KEY.encode() not in f.read(), name


@pytest.fixture
def server_factory():
    servers = []

    def make(*args, **kwargs):
        servers.append(ScriptedJudge(*args, **kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


# ----------------------------------------------------------------------------- judge
def test_parse_choice_is_strict():
    replies = ["A", "B", "A.", " b ", "b.\n", "\tA "]
    assert [judge.parse_choice(s) for s in replies] == ["A", "B", "A", "B", "B", "A"]
    for bad in ["C", "A..", "AB", "A or B", "", ".", "A!", "'A'", "A. B"]:
        assert judge.parse_choice(bad) is None, bad


def test_wilson_interval():
    lo, hi = judge.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = judge.wilson_interval(1.0, 10)  # never of zero width at the ends
    assert hi == 1.0 and 0.6 < lo < 0.8


def test_judge_counts_retries_and_keeps_the_key_secret(tmp_path, server_factory, monkeypatch, capsys):
    script = {  # (example, order): replies, one per request
        (0, "model_as_a"): [("429", "1"), ("ok", "A")], (0, "model_as_b"): [("ok", "B")],        # win
        (1, "model_as_a"): [("500",), ("ok", "B")], (1, "model_as_b"): [("ok", "A")],            # loss
        (2, "model_as_a"): [("ok", "A")], (2, "model_as_b"): [("ok", "A")],                      # tie (split)
        (3, "model_as_a"): [("slow", 4.0, "A"), ("ok", "A.")], (3, "model_as_b"): [("ok", " b ")],  # win
        (4, "model_as_a"): [("badjson",), ("ok", "A")], (4, "model_as_b"): [("ok", "A")],        # tie (split)
        (5, "model_as_a"): [("ok", "C")], (5, "model_as_b"): [("ok", "B")],                      # invalid
        (6, "model_as_a"): [("ok", "B.")], (6, "model_as_b"): [("ok", "a")],                     # loss
    }
    server = server_factory(script)
    gens, out = tmp_path / "gens.jsonl", tmp_path / "judged.jsonl"
    write_generations(gens, 7)
    monkeypatch.setenv(KEY_ENV, KEY)
    sleeps = []
    monkeypatch.setattr(judge, "pause", lambda s, stop: sleeps.append(s))  # no real waiting in tests

    summary = evaluate.main(judge_argv(gens, out, server.url))
    expected = {"wins": 2, "losses": 2, "ties": 2, "invalid": 1, "n": 6, "win_rate": 0.5,
                "single_order_win_rate": 4 / 6}  # model as A: ex0, 2, 3, 4 pick it; ex1, 6 don't; ex5 is "C"
    assert {k: summary[k] for k in expected} == expected
    assert summary["ci_low"] < 0.5 < summary["ci_high"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["wins"] == 2 and printed["win_rate"] == 0.5
    verdicts = {r["id"]: r["verdict"] for r in read_jsonl(out)}
    assert verdicts == {"ex0": "win", "ex1": "loss", "ex2": "tie", "ex3": "win", "ex4": "tie",
                        "ex5": "invalid", "ex6": "loss"}
    assert server.total() == 14 + 4  # one retry each for the 429, the 500, the timeout and the bad body
    assert 1.0 in sleeps  # Retry-After honoured
    assert server.auth == {f"Bearer {KEY}"}

    before = server.total()  # a finished run, rerun: everything from the cache
    again = evaluate.main(judge_argv(gens, out, server.url))
    assert server.total() == before
    assert {k: again[k] for k in expected} == expected
    captured = capsys.readouterr()
    assert_key_nowhere(tmp_path, captured.out, captured.err)


def test_judge_refused_key_stops_without_leaking_it(tmp_path, server_factory, monkeypatch, capsys):
    server = server_factory(default=("401",))
    gens = tmp_path / "gens.jsonl"
    write_generations(gens, 2)
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(SystemExit) as e:
        evaluate.main(judge_argv(gens, tmp_path / "judged.jsonl", server.url, workers=1))
    assert "HTTP 401" in str(e.value) and "***" in str(e.value) and KEY not in str(e.value)
    assert max(server.counts.values()) == 1  # not retried: repeating a refused key cannot help
    captured = capsys.readouterr()
    assert_key_nowhere(tmp_path, captured.out, captured.err)


def test_judge_killed_midway_resends_only_missing(tmp_path, server_factory, monkeypatch, capsys):
    server = server_factory(default=("ok", "A"))
    server.block_after = 5  # answer five requests, then hang until the client is killed
    gens, out = tmp_path / "gens.jsonl", tmp_path / "judged.jsonl"
    cache = tmp_path / "judge_cache.jsonl"
    write_generations(gens, 7)  # 14 prompts
    env = dict(os.environ, **{KEY_ENV: KEY})
    proc = subprocess.Popen([sys.executable, "evaluate.py", *judge_argv(gens, out, server.url, workers=2)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (cache.exists() and cache.read_text().count("\n") == 5):
        time.sleep(0.05)
    proc.kill()
    stdout, stderr = proc.communicate()
    cached = judge.load_cache(cache)
    assert len(cached) == 5 and not out.exists()
    with open(cache, "a") as f:  # and a record torn by the crash
        f.write('{"key": "0123')

    server.block_after, server.counts = None, {}
    server.gate.set()
    monkeypatch.setenv(KEY_ENV, KEY)
    summary = evaluate.main(judge_argv(gens, out, server.url))
    assert server.total() == 14 - 5 and set(server.counts.values()) == {1}
    sent = {judge.cache_key("judge-x", p) for p in server.counts}
    assert sent.isdisjoint(cached) and len(judge.load_cache(cache)) == 14
    assert summary["n"] == 7 and summary["ties"] == 7  # "A" in both orders: a split every time

    evaluate.main(judge_argv(gens, out, server.url))  # finished: rerun sends nothing
    assert server.total() == 14 - 5
    captured = capsys.readouterr()
    assert_key_nowhere(tmp_path, stdout, stderr, captured.out, captured.err)


def test_dpo_negatives_writes_rejected_by_id(tmp_path, server_factory, monkeypatch):
    server = server_factory({(i, "model_as_a"): [("ok", f"  unhelpful-{i}\n")] for i in range(3)})
    examples, out = tmp_path / "train.jsonl", tmp_path / "dpo_negatives.jsonl"
    with open(examples, "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"ex{i}", "prompt": f"q-{i}", "response": f"ref-{i}"}) + "\n")
    monkeypatch.setenv(KEY_ENV, KEY)
    argv = ["dpo-negatives", "--examples", str(examples),
            "--judge-url", server.url, "--judge-model", "judge-x",
            "--out", str(out), "--api-key-env", KEY_ENV, "--backoff", "0.001"]
    evaluate.main(argv)
    assert read_jsonl(out) == [{"id": f"ex{i}", "rejected": f"unhelpful-{i}"} for i in range(3)]
    prompt = next(iter(server.counts))
    assert prompt.startswith("Given the ground truth instruction and response, "
                             "can you generate a not helpful")
    evaluate.main(argv)
    assert server.total() == 3


def test_dpo_negatives_from_a_task_uses_data_py_ids(tmp_path, server_factory, monkeypatch):
    server = server_factory({(i, "model_as_a"): [("ok", f"unhelpful-{i}")] for i in range(3)})
    tokenizer.byte_tokenizer().save(str(tmp_path / "tok"))
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        f.writelines(json.dumps({"prompt": f"q-{i}", "response": f"ref-{i}"}) + "\n" for i in range(3))
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "dpo_negatives.jsonl"
    evaluate.main(["dpo-negatives", "--task", f"jsonl:{pairs}", "--split", "all",
                   "--tokenizer", str(tmp_path / "tok"), "--max-len", "64",
                   "--judge-url", server.url, "--judge-model", "judge-x", "--out", str(out),
                   "--api-key-env", KEY_ENV])
    assert read_jsonl(out) == [{"id": f"pairs-{i}", "rejected": f"unhelpful-{i}"} for i in range(3)]




def test_judge_from_code_without_evaluate(tmp_path, server_factory):
    server = server_factory({(0, "model_as_a"): [("ok", "A")], (0, "model_as_b"): [("ok", "B")]})
    rows = [{"id": "ex0", "prompt": "q-0", "reference": "ref-0", "generation": "gen-0"}]
    records, summary = judge.judge_generations(rows, "dolly", str(tmp_path / "cache.jsonl"), url=server.url,
                                               model="judge-x", workers=1)
    assert [r["verdict"] for r in records] == ["win"] and summary["win_rate"] == 1.0


@pytest.mark.parametrize("path,allowed", [("judge.py", {"requests"}), ("mauve.py", {"numpy", "scipy"})])
def test_copyable_files_need_only_their_libraries(path, allowed):
    """judge.py and mauve.py import nothing of ours, so each can be copied into another project alone."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names - set(sys.stdlib_module_names) == allowed
