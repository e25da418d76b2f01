"""evaluate.py: the LLM judge against a scripted local HTTP server, and MAUVE against hand computations."""
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import data
import evaluate
import model

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
            self.send(h, 401, f'{{"error": "Incorrect API key provided: {h.headers.get("Authorization")}"}}'.encode())
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
    return ["judge", "--generations", str(gens), "--task", "dolly", "--judge-url", url, "--judge-model", "judge-x",
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
    assert [evaluate.parse_choice(s) for s in ["A", "B", "A.", " b ", "b.\n", "\tA "]] == ["A", "B", "A", "B", "B", "A"]
    for bad in ["C", "A..", "AB", "A or B", "Response A", "", ".", "A!", "'A'", "A. B"]:
        assert evaluate.parse_choice(bad) is None, bad


def test_wilson_interval():
    lo, hi = evaluate.wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = evaluate.wilson_interval(1.0, 10)  # never of zero width at the ends
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
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: sleeps.append(s))  # no real waiting in tests

    summary = evaluate.main(judge_argv(gens, out, server.url))
    expected = {"wins": 2, "losses": 2, "ties": 2, "invalid": 1, "n": 6, "win_rate": 0.5,
                "single_order_win_rate": 4 / 6}  # model as A: ex0, 2, 3, 4 pick it; ex1, 6 don't; ex5 is "C"
    assert {k: summary[k] for k in expected} == expected
    assert summary["ci_low"] < 0.5 < summary["ci_high"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["wins"] == 2 and printed["win_rate"] == 0.5
    verdicts = {r["id"]: r["verdict"] for r in evaluate.read_jsonl(out)}
    assert verdicts == {"ex0": "win", "ex1": "loss", "ex2": "tie", "ex3": "win", "ex4": "tie", "ex5": "invalid",
                        "ex6": "loss"}
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
    cached = evaluate.load_cache(cache)
    assert len(cached) == 5 and not out.exists()
    with open(cache, "a") as f:  # and a record torn by the crash
        f.write('{"key": "0123')

    server.block_after, server.counts = None, {}
    server.gate.set()
    monkeypatch.setenv(KEY_ENV, KEY)
    summary = evaluate.main(judge_argv(gens, out, server.url))
    assert server.total() == 14 - 5 and set(server.counts.values()) == {1}
    sent = {evaluate.cache_key("judge-x", p) for p in server.counts}
    assert sent.isdisjoint(cached) and len(evaluate.load_cache(cache)) == 14
    assert summary["n"] == 7 and summary["ties"] == 7  # "A" in both orders: a split every time

    evaluate.main(judge_argv(gens, out, server.url))  # finished: rerun sends nothing
    assert server.total() == 14 - 5
    captured = capsys.readouterr()
    assert_key_nowhere(tmp_path, stdout, stderr, captured.out, captured.err)


def test_dpo_negatives_writes_rejected_by_id(tmp_path, server_factory, monkeypatch):
    server = server_factory({(i, "model_as_a"): [("ok", f"  unhelpful-{i}\n")] for i in range(3)})
    examples, out = tmp_path / "train.jsonl", tmp_path / "dpo_negatives.jsonl"
    with open(examples, "w") as f:
        f.writelines(json.dumps({"id": f"ex{i}", "prompt": f"q-{i}", "response": f"ref-{i}"}) + "\n" for i in range(3))
    monkeypatch.setenv(KEY_ENV, KEY)
    argv = ["dpo-negatives", "--examples", str(examples), "--judge-url", server.url, "--judge-model", "judge-x",
            "--out", str(out), "--api-key-env", KEY_ENV, "--backoff", "0.001"]
    evaluate.main(argv)
    assert evaluate.read_jsonl(out) == [{"id": f"ex{i}", "rejected": f"unhelpful-{i}"} for i in range(3)]
    prompt = next(iter(server.counts))
    assert prompt.startswith("Given the ground truth instruction and response, can you generate a not helpful")
    evaluate.main(argv)
    assert server.total() == 3


def test_dpo_negatives_from_a_task_uses_data_py_ids(tmp_path, server_factory, monkeypatch):
    server = server_factory({(i, "model_as_a"): [("ok", f"unhelpful-{i}")] for i in range(3)})
    model.byte_tokenizer().save(str(tmp_path / "tok"))
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        f.writelines(json.dumps({"prompt": f"q-{i}", "response": f"ref-{i}"}) + "\n" for i in range(3))
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "dpo_negatives.jsonl"
    evaluate.main(["dpo-negatives", "--task", f"jsonl:{pairs}", "--split", "all", "--tokenizer", str(tmp_path / "tok"),
                   "--max-len", "64", "--judge-url", server.url, "--judge-model", "judge-x", "--out", str(out),
                   "--api-key-env", KEY_ENV])
    assert evaluate.read_jsonl(out) == [{"id": f"pairs-{i}", "rejected": f"unhelpful-{i}"} for i in range(3)]


# ----------------------------------------------------------------------------- MAUVE
def hand_mauve(p, q, size=25, c=5):
    """The reference's definition, written out with plain floats: curve points, sort, trapezoids."""
    def kl(a, r):
        return sum(ai * math.log(ai / ri) for ai, ri in zip(a, r) if ai > 0)
    pts = [(1.0, 0.0), (0.0, 1.0)]
    for i in range(size):
        w = 1e-6 + i * (1 - 2e-6) / (size - 1)
        r = [w * pi + (1 - w) * qi for pi, qi in zip(p, q)]
        pts.append((math.exp(-c * kl(q, r)), math.exp(-c * kl(p, r))))

    def area(points):
        points = sorted(points)
        return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return 0.5 * (area(pts) + area([(y, x) for x, y in pts]))


def test_mauve_area_matches_a_hand_computation():
    for p, q in [([0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]), ([0.25] * 4, [0.7, 0.1, 0.1, 0.1]),
                 ([0.9, 0.1, 0.0], [0.0, 0.5, 0.5])]:
        assert evaluate.mauve_from_histograms(p, q) == pytest.approx(hand_mauve(p, q), abs=1e-9)


def test_mauve_identical_features_give_one():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert evaluate.compute_mauve(x, x) == pytest.approx(1.0, abs=1e-12)
    assert evaluate.mauve_from_histograms([0.2, 0.8], [0.2, 0.8]) == pytest.approx(1.0, abs=1e-12)


def test_mauve_disjoint_gives_the_grid_value_not_zero():
    grid = evaluate.mauve_from_histograms([0.5, 0.5, 0, 0], [0, 0, 0.3, 0.7])
    assert grid == pytest.approx(hand_mauve([1, 0], [0, 1]), abs=1e-12)
    assert grid == pytest.approx(0.0040720962619612, abs=1e-12)
    rng = np.random.default_rng(1)  # two far-apart point clouds: k-means separates them completely
    p, q = rng.normal(size=(40, 8)) * 0.01 + 5, rng.normal(size=(40, 8)) * 0.01 - 5
    p[:, 1], q[:, 1] = 5, 5  # not antipodal after L2 normalisation, still far apart
    assert evaluate.compute_mauve(p, q, num_buckets=2) == pytest.approx(grid, abs=1e-12)


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 3)) * 10
    truth = rng.integers(0, 5, size=400)
    x = (centres[truth] + rng.normal(size=(400, 3)) * 0.1).astype(np.float32)
    labels = evaluate.kmeans(x, 5, num_redo=3, seed=0)
    assert len({(t, l) for t, l in zip(truth, labels)}) == 5  # a bijection between clusters and blobs
    few = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, 4 clusters: one stays empty
    labels = evaluate.kmeans(few, 4, num_redo=2, seed=0).reshape(3, 10)
    assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == 3


@pytest.mark.parametrize("n,d", [(200, 20), (15, 40)])
def test_pca_axes_span_the_top_principal_subspace(n, d):
    x = np.random.default_rng(0).normal(size=(n, d)) * np.linspace(3, 0.1, d)
    axes = evaluate.pca_axes(x, 0.9)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    m = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.9)) + 1
    assert axes.shape == (d, m)
    np.testing.assert_allclose(axes @ axes.T, vt[:m].T @ vt[:m], atol=1e-8)


def test_mauve_cli_prints_one_json_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.normal(size=(60, 8)))
    np.save(tmp_path / "q.npy", rng.normal(size=(50, 8)) + 0.5)
    evaluate.main(["mauve", "--p", str(tmp_path / "p.npy"), "--q", str(tmp_path / "q.npy"),
                   "--out", str(tmp_path / "m.mauve.json")])
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["mauve"] < 1 and result["n_p"] == 60 and result["n_q"] == 50
    assert json.load(open(tmp_path / "m.mauve.json"))["mauve"] == result["mauve"]


# ----------------------------------------------------------------------------- generate, interpolate, report
def tiny_config(**overrides):
    return model.ModelConfig(**{**dict(model_type="gpt2", vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                       n_inner=64, max_seq_len=64, bos_id=None, eos_id=256), **overrides})


def save_tiny(path, seed, **overrides):
    torch.manual_seed(seed)
    model.Transformer(tiny_config(**overrides)).save_pretrained(str(path), model.byte_tokenizer())
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny(root / "mle" / "final", 0), save_tiny(root / "cpo" / "final", 1)


def raw_tensors(folder):
    """{name: the tensor's bytes}: equal means bit for bit, NaN and -0.0 included."""
    tensors = model.read_safetensors(os.path.join(folder, "model.safetensors"))
    return {k: v.reshape(-1).view(torch.uint8) for k, v in tensors.items()}


def test_interpolate_endpoints_are_exact(tiny_pair, tmp_path):
    mle, cpo = tiny_pair
    evaluate.main(["interpolate", "--mle", mle, "--cpo", cpo, "--alphas", "0,0.3,1", "--out", str(tmp_path / "ens")])
    for alpha, endpoint in [("1", mle), ("0", cpo)]:
        got, want = raw_tensors(tmp_path / "ens" / f"alpha_{alpha}"), raw_tensors(endpoint)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    a, b = (model.read_safetensors(os.path.join(d, "model.safetensors")) for d in (mle, cpo))
    mid = model.read_safetensors(str(tmp_path / "ens" / "alpha_0.3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(mid[k], 0.3 * a[k] + 0.7 * b[k], rtol=0, atol=1e-6)
    net, tok = model.load(str(tmp_path / "ens" / "alpha_0.3"))  # a loadable HF folder, tokenizer included
    assert tok is not None and net.config == tiny_config()
    with open(tmp_path / "ens" / "alpha_0.3" / "interpolation.json") as f:
        assert json.load(f)["alpha"] == 0.3


def test_interpolate_refuses_mismatched_checkpoints(tiny_pair, tmp_path):
    mle, _ = tiny_pair
    deeper = save_tiny(tmp_path / "deeper", 2, n_layer=3)
    with pytest.raises(SystemExit, match="different architectures.*n_layer: 2 vs 3"):
        evaluate.main(["interpolate", "--mle", mle, "--cpo", deeper, "--alphas", "0.5", "--out", str(tmp_path / "x")])
    reshaped = save_tiny(tmp_path / "reshaped", 3)  # same config.json, one tensor of another shape
    path = os.path.join(reshaped, "model.safetensors")
    tensors = {k: v.clone() for k, v in model.read_safetensors(path).items()}
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"][:16].clone()
    model.write_safetensors(path, tensors, {"format": "pt"})
    with pytest.raises(SystemExit, match="tensor 'transformer.ln_f.weight': \\(32,\\)"):
        evaluate.main(["interpolate", "--mle", mle, "--cpo", reshaped, "--alphas", "0.5", "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("flags,label", [([], "greedy"), (["--num-beams", "2"], "beam2"),
                                         (["--temperature", "1", "--top-k", "5"], "top-k5-T1"),
                                         (["--temperature", "0.8", "--top-p", "0.9"], "top-p0.9-T0.8")])
def test_generate_decodings_from_the_command_line(tiny_pair, tmp_path, flags, label):
    out = tmp_path / "gens.jsonl"
    evaluate.main(["generate", "--model", tiny_pair[0], "--task", "synthetic", "--n", "5", "--out", str(out),
                   "--max-new-tokens", "6", "--batch-size", "2", *flags])
    rows = evaluate.read_jsonl(out)
    assert len({r["id"] for r in rows}) == 5
    for r in rows:
        assert set(r) == {"id", "prompt", "reference", "generation", "config"} and r["config"]["decoding"] == label
        assert r["prompt"].endswith("=") and isinstance(r["generation"], str)


def test_generate_resumes_skipping_written_ids(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "gens.jsonl"
    argv = ["generate", "--model", tiny_pair[0], "--task", "synthetic", "--n", "6", "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "4"]
    evaluate.main(argv)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:10])  # killed while writing the fifth line
    sent = []
    real = evaluate.generate_batch
    def counting(net, tok, prompts, *args, **kwargs):
        sent.extend(prompts)
        return real(net, tok, prompts, *args, **kwargs)
    monkeypatch.setattr(evaluate, "generate_batch", counting)
    evaluate.main(argv)
    assert len(sent) == 2
    now = out.read_text().split("\n")
    assert now[4] == lines[4][:10] and now[-1] == ""  # the torn line was ended, then new records followed
    ids = [json.loads(line)["id"] for i, line in enumerate(now[:-1]) if i != 4]
    assert sorted(ids) == sorted(json.loads(l)["id"] for l in lines)
    evaluate.main(argv)  # complete: nothing to do
    assert len(sent) == 2


def test_task_scores_and_featurize(tiny_pair):
    net, tok = model.load(tiny_pair[0])
    examples = data.load_task("synthetic", "test", tok, 48, n=5)
    scores = evaluate.task_scores(net, tok, examples, "synthetic", batch_size=2)
    assert set(scores) >= {"exact_match", "correct_stop"} and all(0 <= v <= 1 for v in scores.values())
    texts = ["hello", "a longer text, padded less", "x"]
    feats = evaluate.featurize(texts, tiny_pair[0], batch_size=2)
    for text, f in zip(texts, feats):  # batched and padded == alone
        alone = net(torch.tensor([tok.encode(text)]), return_hidden=True)[0, -1]
        np.testing.assert_allclose(f, alone.detach().numpy(), atol=1e-5)


def test_report_table(tmp_path, capsys):
    run = tmp_path / "run"
    for method, alpha, rate in [("mle", None, 0.40), ("cpo_mixnr", 0.0, 0.55), ("cpo_mixnr", 0.5, 0.50)]:
        folder = run / f"{method}_{alpha}"
        folder.mkdir(parents=True)
        config = {"model": f"/x/{method}/final", "decoding": "greedy"}
        if alpha is not None:  # as interpolation.json adds it
            config.update(alpha=alpha, method=method)
        with open(folder / "greedy.jsonl", "w") as f:
            f.write(json.dumps({"id": "a", "prompt": "", "reference": "", "generation": "", "config": config}) + "\n")
        summary = {"win_rate": rate, "ci_low": rate - 0.05, "ci_high": rate + 0.05, "n": 100, "config": config}
        with open(folder / "greedy.judge.jsonl.summary.json", "w") as f:
            json.dump(summary, f)
        with open(folder / "greedy.mauve.json", "w") as f:
            json.dump({"mauve": rate + 0.1, "p": str(folder / "greedy.jsonl")}, f)
    table = evaluate.main(["report", str(run)])
    assert "| mle | - | greedy | 0.400 [0.350, 0.450] | 100 | 0.500 |" in table
    assert "| cpo_mixnr | 0.5 | greedy | 0.500 [0.450, 0.550] | 100 | 0.600 |" in table
    assert table.count("\n") == 4 and (run / "report.md").exists()
