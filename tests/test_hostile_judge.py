"""Hostile and careless input to judge, MAUVE and evaluate's commands (issue 15): the API key never leaks,
no input is overwritten, a waiting judge stops on Ctrl-C, and every refusal names its cause. The judge is a
fake OpenAI-compatible server on 127.0.0.1 whose every answer a test chooses."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import evaluate
import judge
import mauve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-hostile-0123456789abcdef"
KEY_ENV = "NANOCPO_TEST_HOSTILE_KEY"


# ----------------------------------------------------------------------------- a fake judge
class FakeJudge:
    """POST /v1/chat/completions on 127.0.0.1: answer(prompt, authorization) -> (status, body, headers).
    `seen` lists the prompts in arrival order."""

    def __init__(self, answer):
        self.answer, self.seen = answer, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["messages"][-1]["content"]
                fake.seen.append(prompt)
                status, body, headers = fake.answer(prompt, self.headers.get("Authorization"))
                self.send_response(status)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # a client that hung up: expected here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def reply(text):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode(), {}


@pytest.fixture
def fake_judge():
    servers = []

    def make(answer):
        servers.append(FakeJudge(answer))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def write_generations(path, n, **override):
    rows = [{"id": f"ex{i}", "prompt": f"q-{i}", "reference": f"ref-{i}", "generation": f"gen-{i}",
             "config": {"model": "tiny"}, **override} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def judge_argv(gens, out, url, *extra):
    return ["judge", "--generations", str(gens), "--task", "dolly",
            "--judge-url", url, "--judge-model", "judge-x",
            "--out", str(out), "--api-key-env", KEY_ENV, "--timeout", "5", "--backoff", "0.001",
            "--max-retries", "2", *extra]


def files_holding(folder, secret):
    hits = []
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                if secret.encode() in f.read():
                    hits.append(name)
    return hits


# ----------------------------------------------------------------------------- 2: the API key
def test_a_refusal_is_scrubbed_before_it_is_cut(fake_judge):
    quote = "Incorrect API key provided: Bearer "
    body = "x" * (300 - 10 - len(quote)) + quote + KEY  # a cut at 300 characters falls inside the key
    server = fake_judge(lambda p, auth: (401, body.encode(), {}))
    with pytest.raises(judge.JudgeError, match="HTTP 401") as e:
        judge.chat_completion("q", server.url, "judge-x", api_key=KEY)
    assert KEY[:10] not in str(e.value) and len(str(e.value)) <= 300


def test_a_reply_quoting_the_key_is_never_stored_or_printed(fake_judge, tmp_path, monkeypatch, capsys):
    server = fake_judge(lambda p, auth: reply(f"A (request had Authorization: {auth})"))
    gens, out = tmp_path / "gens.jsonl", tmp_path / "judged.jsonl"
    write_generations(gens, 2)
    monkeypatch.setenv(KEY_ENV, KEY)
    evaluate.main(judge_argv(gens, out, server.url))
    captured = capsys.readouterr()
    assert len(server.seen) == 4 and KEY not in captured.out + captured.err
    assert files_holding(tmp_path, KEY) == []
    assert "***" in (tmp_path / "judge_cache.jsonl").read_text()


# ----------------------------------------------------------------------------- 3: coinciding paths
@pytest.mark.parametrize("flag", ["--out", "--cache"])
def test_judge_never_overwrites_its_generations(fake_judge, tmp_path, monkeypatch, flag):
    server = fake_judge(lambda p, auth: reply("A"))
    gens = tmp_path / "gens.jsonl"
    write_generations(gens, 2)
    before = gens.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink(gens, tmp_path / "link.jsonl")
    same = {"--out": str(tmp_path / "sub" / ".." / "gens.jsonl"),
            "--cache": str(tmp_path / "link.jsonl")}[flag]
    argv = judge_argv(gens, tmp_path / "judged.jsonl", server.url)
    if flag == "--out":
        argv[argv.index("--out") + 1] = same
    else:
        argv += ["--cache", same]
    with pytest.raises(SystemExit, match=f"--generations and {flag} are the same file"):
        evaluate.main(argv)
    assert gens.read_bytes() == before and server.seen == []


# ------------------------------------------------------------------------ 7, 11: our jsonl, read by file:line
def test_judge_names_the_torn_or_null_line(fake_judge, tmp_path):
    server = fake_judge(lambda p, auth: reply("A"))
    gens = tmp_path / "gens.jsonl"
    write_generations(gens, 2)
    with open(gens, "a") as f:
        f.write('{"id": "ex2", "prompt": "q-2", "refer')  # generate killed mid-line
    with pytest.raises(SystemExit, match="gens.jsonl:3: bad JSON"):
        evaluate.main(judge_argv(gens, tmp_path / "judged.jsonl", server.url))
    write_generations(gens, 2, generation=None)  # would be judged as the text "None"
    with pytest.raises(SystemExit, match="gens.jsonl:1: 'generation' must be a string, got null"):
        evaluate.main(judge_argv(gens, tmp_path / "judged.jsonl", server.url))
    with pytest.raises(ValueError, match="row 0: 'generation' must be a string"):  # from code, too
        judge.judge_generations([{"id": "a", "prompt": "q", "reference": "r", "generation": None}], "dolly",
                                str(tmp_path / "cache.jsonl"), url=server.url, model="judge-x")
    assert server.seen == []


def test_mauve_names_the_torn_or_null_line(tmp_path):
    gens = tmp_path / "gens.jsonl"
    write_generations(gens, 2)
    argv = ["mauve", "--p-text", str(gens), "--q-text", str(gens),
            "--featurizer", str(tmp_path / "never-loaded")]
    with open(gens, "a") as f:
        f.write('{"id": "ex2", "gener')
    with pytest.raises(SystemExit, match="gens.jsonl:3: bad JSON"):
        evaluate.main(argv)
    write_generations(gens, 2, generation=None)
    with pytest.raises(SystemExit, match="gens.jsonl:1: expected an object whose 'generation' is a string"):
        evaluate.main(argv)


# ----------------------------------------------------------------------------- 8: Retry-After and Ctrl-C
@pytest.mark.parametrize("retry_after", ["3600", "1e999"])
def test_retry_after_is_capped(fake_judge, retry_after):
    answers = iter([(429, b'{"error": "slow down"}', {"Retry-After": retry_after})])
    server = fake_judge(lambda p, auth: next(answers, reply("B")))
    result = []
    worker = threading.Thread(target=lambda: result.append(
        judge.chat_completion("q", server.url, "judge-x", max_backoff=0.2)), daemon=True)
    t0 = time.time()
    worker.start()
    worker.join(10)
    assert result == ["B"] and time.time() - t0 < 5 and len(server.seen) == 2


def test_ctrl_c_ends_a_waiting_judge_with_the_cache_intact(fake_judge, tmp_path):
    def answer(prompt, auth):  # every prompt answered but one, which is told to come back in an hour
        if "gen-3" in prompt.split("Response A:")[1].split("\n")[0]:
            return 429, b'{"error": "slow down"}', {"Retry-After": "3600"}
        return reply("A")
    server = fake_judge(answer)
    gens, out, cache = tmp_path / "gens.jsonl", tmp_path / "judged.jsonl", tmp_path / "judge_cache.jsonl"
    write_generations(gens, 4)  # 8 prompts, 7 answerable
    run = ("import json, sys, judge\n"  # judge.py alone: a run starts in well under a second (no torch)
           "rows = [json.loads(line) for line in open(sys.argv[1])]\n"
           "judge.judge_generations(rows, 'dolly', sys.argv[2], url=sys.argv[3], model='judge-x',\n"
           "                        workers=2, timeout=5, backoff=60)\n"  # 60 s, the cap: a real wait
           "open(sys.argv[4], 'w').write('finished')")                     # unless Ctrl-C ends it
    proc = subprocess.Popen([sys.executable, "-c", run, str(gens), str(cache), server.url, str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (len(judge.load_cache(cache)) == 7 and len(server.seen) == 8):
            time.sleep(0.05)
        assert len(judge.load_cache(cache)) == 7, "the fake judge's answers did not arrive"
        time.sleep(0.5)  # the client is now waiting out the Retry-After
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        assert time.time() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr and not out.exists()
    assert "judge: interrupted; 7 answers kept in" in stderr
    lines = cache.read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["reply"] == "A" for line in lines)


# ----------------------------------------------------------------------------- 9: bad numbers
@pytest.mark.parametrize("flag,value", [("--max-retries", "-1"), ("--workers", "0"), ("--timeout", "0"),
                                        ("--timeout", "nan"), ("--backoff", "-1")])
def test_judge_refuses_bad_numbers_by_flag(tmp_path, capsys, flag, value):
    argv = judge_argv(tmp_path / "gens.jsonl", tmp_path / "out.jsonl", "http://127.0.0.1:9/v1", flag, value)
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


def test_judge_from_code_refuses_bad_settings(tmp_path):
    for bad in [dict(workers=0), dict(max_retries=-1), dict(timeout=0), dict(backoff=float("inf"))]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            judge.ask_all(["q"], str(tmp_path / "c.jsonl"), "http://127.0.0.1:9/v1", "judge-x", **bad)
    assert not (tmp_path / "c.jsonl").exists()


def test_mauve_and_interpolate_refuse_bad_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["mauve", "--p", "p.npy", "--q", "q.npy", "--num-buckets", "0"])
    assert e.value.code == 2
    assert "argument --num-buckets: must be a finite number >= 1" in capsys.readouterr().err
    out = str(tmp_path / "ens")
    with pytest.raises(SystemExit, match="'' is not a number"):
        evaluate.main(["interpolate", "--mle", "m", "--cpo", "c", "--alphas", "0,,1", "--out", out])
    refused = r"0.1234568 is outside \[0, 1\], or another alpha there is also written to alpha_0.123457/"
    with pytest.raises(SystemExit, match=refused):
        evaluate.main(["interpolate", "--mle", "m", "--cpo", "c",
                       "--alphas", "0.1234567,0.1234568", "--out", out])
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- 12: MAUVE's inputs
def test_mauve_refuses_too_few_samples_and_non_finite_features(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    with pytest.raises(ValueError, match="needs at least 2 samples in each set, got 1 in p_features and 30"):
        mauve.compute_mauve(x[:1], x)
    with pytest.raises(ValueError, match="needs at least 8 samples in each set"):
        mauve.compute_mauve(x, x[:5], num_buckets=8)
    for where in ("p", "q"):
        for bad in (np.nan, np.inf):
            y = x.copy()
            y[3, 1] = bad
            p, q = (y, x) if where == "p" else (x, y)
            with pytest.raises(ValueError, match=f"{where}_features has non-finite values .* first row 3"):
                mauve.compute_mauve(p, q)
    np.save(tmp_path / "p.npy", x[:1])
    np.save(tmp_path / "q.npy", x)
    with pytest.raises(SystemExit, match="mauve: MAUVE with 2 clusters needs at least 2 samples"):
        evaluate.main(["mauve", "--p", str(tmp_path / "p.npy"), "--q", str(tmp_path / "q.npy")])


# ----------------------------------------------------------------------------- 13: the verdict parser
@pytest.mark.parametrize("text,choice", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("**A**", "A"), ("Response A", "A"), ("Answer: B", "B"),
    ("Response A: it names a colour, as asked.", "A"), ("A: shorter and correct", "A"),
    ("Response B:\nbetter", "B"), ("**Response B**", "B"), ("response (b).", "B"), ("Continuation A", "A")])
def test_parse_choice_takes_one_leading_choice(text, choice):
    assert judge.parse_choice(text) == choice


@pytest.mark.parametrize("text", ["C", "A or B", "A. B", "AB", "A!", "'A'", "", "Both are good",
                                  "Response C", "A and B", "Response A and Response B", "I prefer B", "A\nB",
                                  "a good answer"])
def test_parse_choice_keeps_the_rest_invalid(text):
    assert judge.parse_choice(text) is None


def test_summary_shows_the_first_invalid_replies(fake_judge, tmp_path, monkeypatch, capsys):
    server = fake_judge(lambda p, auth: reply("Response A: listed" if "q-0\n" in p
                                              else "I cannot decide between them"))
    gens = tmp_path / "gens.jsonl"
    write_generations(gens, 3)
    monkeypatch.setenv(KEY_ENV, KEY)
    summary = evaluate.main(judge_argv(gens, tmp_path / "judged.jsonl", server.url))
    assert summary["invalid"] == 2 and summary["invalid_replies"] == ["I cannot decide between them"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["invalid_replies"] == ["I cannot decide between them"] and printed["n"] == 1
