"""Hostile and careless input (issue 15): names from a remote that point outside the cache, files that only
look like checkpoints, --resume with other settings or a damaged newest checkpoint, bad numbers, broken model
folders, bad data files and bad servers. Each refusal must name its cause; nothing may be written outside
its folder, nothing lost. Everything runs on the CPU against servers on 127.0.0.1."""
import http.server
import json
import os
import random
import shutil
import threading
from dataclasses import replace

import pytest
import torch

import checkpoint
import data
import hf
import train
from model import ModelConfig, Transformer
from tokenizer import byte_tokenizer

SINGLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_run_preset.py")
# a one-layer run, smaller than test_train.TINY's
ONE_LAYER = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--max_len=32", "--n_train=64", "--n_val=8",
             "--batch_size=4", "--micro_batch_size=2", "--lr=1e-3", "--log_interval=1", "--eval_interval=0",
             "--device=cpu"]


def one_layer_config(**overrides):
    """The train.Config of the ONE_LAYER run, with `overrides` replaced."""
    _, flags = train.parse_args(ONE_LAYER)
    return replace(train.Config(**flags), **overrides)


def tiny_model_folder(folder):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, n_inner=16, max_seq_len=8,
                         bos_id=15, eos_id=15)
    hf.save_pretrained(Transformer(config), str(folder))
    return folder


class Server:
    """127.0.0.1: answers a GET of a path ending in key with routes[key] = a list of (status, headers, body,
    bytes to send) replies, used in turn (the last one repeats); anything else is 404. Logs the paths."""

    def __init__(self):
        self.routes, self.log, self.auth = {}, [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.log.append(self.path)
                server.auth.append(self.headers.get("Authorization"))
                replies = next((r for key, r in server.routes.items() if self.path.endswith(key)), None)
                if not replies:
                    self.send_error(404)
                    return
                status, headers, body, send = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:send])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path, body, status=200, headers=None, send=None):
        sent = len(body) if send is None else send
        self.routes.setdefault(path, []).append((status, headers or {}, body, sent))


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---------------------------------------------------------------------- 1: nothing written outside the cache
@pytest.mark.parametrize("shard", ["ABSOLUTE", "../../../outside/evil.safetensors", "link/evil.safetensors"])
def test_hub_names_cannot_escape_the_cache(tmp_path, server, monkeypatch, shard):
    outside, cache = tmp_path / "outside", tmp_path / "cache"
    outside.mkdir()
    (cache / "org" / "name").mkdir(parents=True)
    os.symlink(outside, cache / "org" / "name" / "link")  # a symlink in the cache that points out of it
    shard = str(outside / "evil.safetensors") if shard == "ABSOLUTE" else shard
    model = tiny_model_folder(tmp_path / "model")
    server.serve("/org/name/resolve/main/config.json", (model / "config.json").read_bytes())
    index = {"metadata": {}, "weight_map": {"transformer.wte.weight": shard}}
    server.serve("/org/name/resolve/main/model.safetensors.index.json", json.dumps(index).encode())
    server.serve("evil.safetensors", (model / "model.safetensors").read_bytes())  # wherever it is asked for
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NANOCPO_CACHE", str(cache))
    with pytest.raises(ValueError, match="outside"):
        hf.load("org/name")
    assert files_under(outside) == []
    assert not any(p.endswith("evil.safetensors") for p in files_under(tmp_path))


# ---------------------------------------------------------------------- 4: only ckpt-NNNNNNN is a checkpoint
def test_only_exact_checkpoint_names_are_rotated_or_resumed(tmp_path):
    out = tmp_path / "run"
    (out / "ckpt-0000001-mybackup").mkdir(parents=True)
    (out / "ckpt-0000001-mybackup" / "notes").write_text("mine")
    (out / "ckpt-notes.txt").write_text("mine too")
    cfg = one_layer_config(steps=3, ckpt_interval=1, keep_last=1, out_dir=str(out))
    train.train(cfg)
    assert (out / "ckpt-0000001-mybackup" / "notes").read_text() == "mine"
    assert (out / "ckpt-notes.txt").read_text() == "mine too"
    assert checkpoint.checkpoints(str(out)) == [str(out / "ckpt-0000003")]
    train.train(replace(cfg, steps=4, resume=True))  # ckpt-notes.txt is not mistaken for a checkpoint
    assert checkpoint.checkpoints(str(out)) == [str(out / "ckpt-0000004")]


# ----------------------------------------------------------------------------- 5: --resume refuses other math
def test_resume_refuses_changed_settings(tmp_path, capsys):
    cfg = one_layer_config(steps=2, out_dir=str(tmp_path / "run"))
    train.train(cfg)
    with pytest.raises(SystemExit) as e:
        train.train(replace(cfg, objective="cpo", negatives="bn:1", lr=2e-3, seed=1, steps=3, resume=True))
    for line in ["objective: 'mle' -> 'cpo'", "lr: 0.001 -> 0.002", "seed: 0 -> 1", "negatives:"]:
        assert line in str(e.value)
    assert "steps" not in str(e.value).split("Only")[0]  # more steps is allowed, so not listed
    with pytest.raises(SystemExit, match="below the checkpoint's step 2"):
        train.train(replace(cfg, steps=1, resume=True))
    # the safe ones
    train.train(replace(cfg, steps=3, log_interval=2, ckpt_interval=5, keep_last=3, resume=True))
    assert "resumed" in capsys.readouterr().out
    cos = one_layer_config(steps=2, schedule="cosine", out_dir=str(tmp_path / "cos"))
    train.train(cos)
    with pytest.raises(SystemExit, match="cosine"):  # the cosine's length is the run's steps: that is math
        train.train(replace(cos, steps=3, resume=True))
    help = train.Config.__dataclass_fields__["resume"].metadata["help"]  # --help says what may change
    assert "keep_last" in help and "log_interval" in help and "--steps may grow" in help


# ----------------------------------------------------------------------------- 6: a damaged newest checkpoint
@pytest.mark.parametrize("damaged", ["trainer.pt", "model/model.safetensors"])
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, damaged):
    cfg = one_layer_config(steps=4, ckpt_interval=2, keep_last=2, out_dir=str(tmp_path / "run"))
    train.train(cfg)
    straight = hf.load(str(tmp_path / "run" / "final"))[0].state_dict()
    bad = tmp_path / "run" / "ckpt-0000004" / damaged
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # a torn file
    capsys.readouterr()
    train.train(replace(cfg, resume=True))
    out = capsys.readouterr().out
    assert str(bad) in out and "fell back to " + str(tmp_path / "run" / "ckpt-0000002") in out
    resumed = hf.load(str(tmp_path / "run" / "final"))[0].state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # steps 3-4 redone, bit for bit


# ----------------------------------------------------------------------------- 9: bad numbers in train.py
@pytest.mark.parametrize("flag, words", [
    ("--steps=-5", "steps=-5"), ("--schedule=linear", "constant | cosine"), ("--dtype=float64", "float32"),
    ("--micro_batch_size=0", "micro_batch_size=0"), ("--batch_size=-4", "batch_size=-4"),
    ("--micro_batch_size=-2", "micro_batch_size=-2"), ("--device=gpu", "cuda:N"),
    ("--log_interval=0", "log_interval"),
])
def test_train_refuses_bad_numbers(tmp_path, flag, words):
    with pytest.raises(SystemExit) as e:
        train.main([SINGLE, *ONE_LAYER, "--steps=2", f"--out_dir={tmp_path}/run", flag])
    assert "bad settings" in str(e.value) and words in str(e.value)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_train_refuses_a_task_without_training_examples(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no training examples"):
        cfg = one_layer_config(steps=2, task=f"jsonl:{tmp_path}/empty.jsonl", out_dir=str(tmp_path / "run"))
        train.train(cfg)


# ----------------------------------------------------------------------------- 10: broken model folders
@pytest.mark.parametrize("edit, words", [
    ({"n_head": 0}, "n_head"), ({"n_layer": "1"}, "n_layer"), ({"n_embd": 8.0}, "n_embd"),
    ({"torch_dtype": "int64"}, "torch_dtype"), ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
])
def test_load_refuses_bad_config_values(tmp_path, edit, words):
    folder = tiny_model_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError) as e:
        hf.load(str(folder))
    assert str(folder / "config.json") in str(e.value) and words in str(e.value)


def test_load_refuses_integer_weights(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    sd = hf.read_safetensors(str(folder / "model.safetensors"))
    sd = {k: v.clone() for k, v in sd.items()}
    sd["transformer.h.0.ln_1.weight"] = sd["transformer.h.0.ln_1.weight"].to(torch.int32)
    hf.write_safetensors(str(folder / "model.safetensors"), sd)
    with pytest.raises(ValueError, match="model.safetensors.*int32"):
        hf.load(str(folder))


def test_mistyped_local_path_is_not_tried_on_the_hub(tmp_path, server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NANOCPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "out" / "final").mkdir(parents=True)
    with pytest.raises(ValueError, match="out/fianl: no such folder"):
        hf.load("out/fianl")
    assert server.log == []  # not one request


# ----------------------------------------------------------------------------- 11: bad data files and servers
def test_data_names_non_utf8_lines_and_duplicate_ids(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "docs.txt").write_bytes(b"a first document\nbad \xff\xfe bytes\n")
    with pytest.raises(ValueError, match=r"docs.txt:2: not UTF-8"):
        data.load_task(f"wiki:{tmp_path}/docs.txt", "all", tok, 32)
    rows = [{"id": "a", "prompt": "p", "response": "r"}, {"id": "b", "prompt": "q", "response": "s"},
            {"id": "a", "prompt": "x", "response": "y"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: id 'a' repeats the one at .*pairs.jsonl:1"):
        data.load_task(f"jsonl:{tmp_path}/pairs.jsonl", "all", tok, 32)
    (tmp_path / "rejected.jsonl").write_text('{"id": "x", "rejected": "1"}\n{"id": "x", "rejected": "2"}\n')
    with pytest.raises(ValueError, match=r"rejected.jsonl:2: id 'x' repeats"):
        data.load_rejected(str(tmp_path / "rejected.jsonl"), [], tok, 32)


def test_data_url_500_is_retried_and_html_or_short_bodies_are_not_cached(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf-secret")  # the hub's token is not sent to a data host (another port)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    tok, body = byte_tokenizer(), b'{"prompt": "p", "response": "r"}\n' * 50
    server.serve("/flaky.jsonl", b"oops", status=500)
    server.serve("/flaky.jsonl", body)
    flaky = data.load_task(f"jsonl:{server.url}/flaky.jsonl", "all", tok, 32, cache_dir=str(tmp_path / "c1"))
    assert len(flaky) == 50
    html = {"Content-Type": "text/html; charset=utf-8"}
    server.serve("/login.jsonl", b"<html>please log in</html>", headers=html)
    with pytest.raises(ValueError, match="HTML"):
        data.load_task(f"jsonl:{server.url}/login.jsonl", "all", tok, 32, cache_dir=str(tmp_path / "c2"))
    assert files_under(tmp_path / "c2") == []
    server.serve("/short.jsonl", body, send=len(body) // 3)  # the first reply cut short, the next one whole
    server.serve("/short.jsonl", body)
    path = data.fetch(f"{server.url}/short.jsonl", cache_dir=str(tmp_path / "c3"))
    assert open(path, "rb").read() == body
    assert server.auth and not any(server.auth)


# ---------------------------------------------------------------------- fuzz: byte flips of a model folder
@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_byte_flips_give_a_load_or_a_value_error_naming_the_file(tmp_path, victim):
    good = tiny_model_folder(tmp_path / "good")
    original = (good / victim).read_bytes()
    rng, outcomes = random.Random(15), {"loaded": 0, "refused": 0}
    folder = tmp_path / "flipped"
    shutil.copytree(good, folder)
    for _ in range(300):
        flipped = bytearray(original)
        flipped[rng.randrange(len(flipped))] ^= rng.randrange(1, 256)
        (folder / victim).write_bytes(bytes(flipped))
        try:
            hf.load(str(folder))
            outcomes["loaded"] += 1
        except ValueError as e:  # any other exception fails the test
            # a changed size in config.json shows as a weight that no longer fits it: that names both
            names_it = str(folder / victim) in str(e)
            assert names_it or victim == "config.json" and "from the config" in str(e), str(e)
            outcomes["refused"] += 1
    assert outcomes["loaded"] and outcomes["refused"], outcomes  # both kinds happened: the flips were real
