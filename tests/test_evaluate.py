"""evaluate.py: generate, interpolate, report and featurize; decoding.task_scores; on tiny random models."""
import json
import os
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

import data
import decoding
import evaluate
import hf
import model
import tokenizer
from common import read_jsonl


# ----------------------------------------------------------------------------- generate, interpolate, report
def tiny_model_config(**overrides):
    """The ModelConfig of a tiny GPT-2 on the byte tokenizer."""
    tiny = dict(model_type="gpt2", vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, n_inner=64,
                max_seq_len=64, bos_id=None, eos_id=256)
    return model.ModelConfig(**{**tiny, **overrides})


def save_tiny(path, seed, **overrides):
    torch.manual_seed(seed)
    net = model.Transformer(tiny_model_config(**overrides))
    hf.save_pretrained(net, str(path), tokenizer.byte_tokenizer())
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return save_tiny(root / "mle" / "final", 0), save_tiny(root / "cpo" / "final", 1)


def raw_tensors(folder):
    """{name: the tensor's bytes}: equal means bit for bit, NaN and -0.0 included."""
    tensors = hf.read_safetensors(os.path.join(folder, "model.safetensors"))
    return {k: v.reshape(-1).view(torch.uint8) for k, v in tensors.items()}


def test_interpolate_endpoints_are_exact(tiny_pair, tmp_path):
    mle, cpo = tiny_pair
    evaluate.main(["interpolate", "--mle", mle, "--cpo", cpo, "--alphas", "0,0.3,1",
                   "--out", str(tmp_path / "ens")])
    for alpha, endpoint in [("1", mle), ("0", cpo)]:
        got, want = raw_tensors(tmp_path / "ens" / f"alpha_{alpha}"), raw_tensors(endpoint)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    a, b = (hf.read_safetensors(os.path.join(d, "model.safetensors")) for d in (mle, cpo))
    mid = hf.read_safetensors(str(tmp_path / "ens" / "alpha_0.3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(mid[k], 0.3 * a[k] + 0.7 * b[k], rtol=0, atol=1e-6)
    net, tok = hf.load(str(tmp_path / "ens" / "alpha_0.3"))  # a loadable HF folder, tokenizer included
    assert tok is not None and net.config == tiny_model_config()
    with open(tmp_path / "ens" / "alpha_0.3" / "interpolation.json") as f:
        assert json.load(f)["alpha"] == 0.3


def test_interpolate_refuses_mismatched_checkpoints(tiny_pair, tmp_path):
    mle, _ = tiny_pair
    deeper = save_tiny(tmp_path / "deeper", 2, n_layer=3)
    with pytest.raises(SystemExit, match="different architectures.*n_layer: 2 vs 3"):
        evaluate.main(["interpolate", "--mle", mle, "--cpo", deeper, "--alphas", "0.5",
                       "--out", str(tmp_path / "x")])
    reshaped = save_tiny(tmp_path / "reshaped", 3)  # same config.json, one tensor of another shape
    path = os.path.join(reshaped, "model.safetensors")
    tensors = {k: v.clone() for k, v in hf.read_safetensors(path).items()}
    tensors["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"][:16].clone()
    hf.write_safetensors(path, tensors, {"format": "pt"})
    with pytest.raises(SystemExit, match="tensor 'transformer.ln_f.weight': \\(32,\\)"):
        evaluate.main(["interpolate", "--mle", mle, "--cpo", reshaped, "--alphas", "0.5",
                       "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("flags,label", [([], "greedy"), (["--num-beams", "2"], "beam2"),
                                         (["--temperature", "1", "--top-k", "5"], "top-k5-T1"),
                                         (["--temperature", "0.8", "--top-p", "0.9"], "top-p0.9-T0.8")])
def test_generate_decodings_from_the_command_line(tiny_pair, tmp_path, flags, label):
    out = tmp_path / "gens.jsonl"
    evaluate.main(["generate", "--model", tiny_pair[0], "--task", "synthetic", "--n", "5", "--out", str(out),
                   "--max-new-tokens", "6", "--batch-size", "2", *flags])
    rows = read_jsonl(out)
    assert len({r["id"] for r in rows}) == 5
    for r in rows:
        assert set(r) == {"id", "prompt", "reference", "generation", "config"}
        assert r["config"]["decoding"] == label
        assert r["prompt"].endswith("=") and isinstance(r["generation"], str)


def test_generate_resumes_skipping_written_ids(tiny_pair, tmp_path, monkeypatch):
    out = tmp_path / "gens.jsonl"
    argv = ["generate", "--model", tiny_pair[0], "--task", "synthetic", "--n", "6", "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "4"]
    evaluate.main(argv)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:10])  # killed while writing the fifth line
    sent = []
    real = decoding.generate_batch
    def counting(net, tok, prompts, *args, **kwargs):
        sent.extend(prompts)
        return real(net, tok, prompts, *args, **kwargs)
    monkeypatch.setattr(decoding, "generate_batch", counting)
    evaluate.main(argv)
    assert len(sent) == 2
    now = out.read_text().splitlines(keepends=True)
    assert now[:4] == lines[:4]  # the torn line was dropped, then the two missing records followed
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(json.loads(l)["id"] for l in lines)
    evaluate.main(argv)  # complete: nothing to do
    assert len(sent) == 2


def test_task_scores_and_featurize(tiny_pair):
    net, tok = hf.load(tiny_pair[0])
    examples = data.load_task("synthetic", "test", tok, 48, n=5)
    scores = decoding.task_scores(net, tok, examples, "synthetic", batch_size=2)
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
            row = {"id": "a", "prompt": "", "reference": "", "generation": "", "config": config}
            f.write(json.dumps(row) + "\n")
        summary = {"win_rate": rate, "ci_low": rate - 0.05, "ci_high": rate + 0.05, "n": 100,
                   "config": config}
        with open(folder / "greedy.judge.jsonl.summary.json", "w") as f:
            json.dump(summary, f)
        with open(folder / "greedy.mauve.json", "w") as f:
            json.dump({"mauve": rate + 0.1, "p": str(folder / "greedy.jsonl")}, f)
    table = evaluate.main(["report", str(run)])
    assert "| mle | - | greedy | 0.400 [0.350, 0.450] | 100 | 0.500 |" in table
    assert "| cpo_mixnr | 0.5 | greedy | 0.500 [0.450, 0.550] | 100 | 0.600 |" in table
    assert table.count("\n") == 4 and (run / "report.md").exists()
    svg = ElementTree.parse(run / "win_rate_vs_alpha.svg").getroot()  # well-formed, one curve of two points
    polylines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 2 and len(polylines[1].get("points").split()) == 2  # the axes, the curve
    assert "cpo_mixnr greedy" in "".join(svg.itertext())
