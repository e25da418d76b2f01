"""miniature.py: the whole experiment (reference, 13 continued runs, scores, alpha sweep, tables)
at a tiny size, one seed, in well under two minutes; and the win/tie/loss rule of its table."""
import os
import subprocess
import sys

import pytest

import data
import miniature
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["ref", "mle", "cpo_an", "cpo_anr", "cpo_bn", "cpo_bnr", "cpo_mn", "cpo_mnr", "cpo_tn", "cpo_tnr",
           "cpo_mixn", "cpo_mixnr", "dpo", "pss"]


def test_miniature_tiny_writes_every_row(tmp_path):
    out = tmp_path / "mini"
    cmd = [sys.executable, "miniature.py", "--scale", "tiny", "--seeds", "0", "--jobs", "1",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")}
    assert set(METHODS) <= rows, f"missing rows {set(METHODS) - rows}"
    alpha = (out / "alpha.md").read_text()
    for a in ["0", "0.1", "0.3", "0.5", "0.7", "0.9"]:
        assert f"\n| {a} |" in alpha
    assert "| ref |" in run.stdout and "| 0.9 |" in run.stdout  # the tables are printed too
    assert (out / "alpha.svg").read_text().startswith("<svg")
    # a rerun trains and scores nothing again: every final model and score file is left untouched
    kept = sorted(out.glob("seed0/*/final/model.safetensors")) + sorted(out.glob("seed0/*/scores.json"))
    assert len(kept) == 2 * (len(METHODS))
    stamps = [p.stat().st_mtime_ns for p in kept]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    assert (out / "results.md").read_text() == table


def test_verdict_needs_a_difference_beyond_the_spread():
    assert miniature.verdict([0.5, 0.6, 0.7], [0.1, 0.2, 0.3]) == "win"
    assert miniature.verdict([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == "loss"
    assert miniature.verdict([0.30, 0.50, 0.70], [0.3, 0.4, 0.5]) == "tie"  # 0.1 apart, std 0.2
    assert miniature.verdict([0.5], [0.1]) == "?"  # one seed: no spread to compare with


def test_paired_verdict_compares_seed_by_seed():
    # every seed 0.1 above its baseline: a win, though the seeds' spread (0.2) hides it from the unpaired rule
    differences, mean, std, paired = miniature.paired_verdict([0.4, 0.6, 0.8], [0.3, 0.5, 0.7])
    assert differences == pytest.approx([0.1] * 3) and mean == pytest.approx(0.1) and paired == "win"
    assert miniature.verdict([0.4, 0.6, 0.8], [0.3, 0.5, 0.7]) == "tie"
    lower_better = miniature.paired_verdict([0.4, 0.6, 0.8], [0.3, 0.5, 0.7], higher_is_better=False)
    assert lower_better[3] == "loss"  # a gap
    assert miniature.paired_verdict([0.4, 0.5, 0.9], [0.3, 0.6, 0.7])[3] == "tie"  # +0.1, -0.1, +0.2
    assert miniature.paired_verdict([0.5], [0.1])[3] == "?"


def test_ensembles_mix_the_mle_run_their_cpo_run_is_judged_against():
    experiment = {"baselines": {"cpo_an_200_lr5e_5_alpha30": "mle_200_lr5e_5"}}
    assert miniature.mle_baseline("cpo_an_200_lr5e_5_alpha30@0.5", experiment) == "mle_200_lr5e_5"
    assert miniature.mle_baseline("cpo_an_200_lr5e_5_alpha30", experiment) == "mle_200_lr5e_5"
    assert miniature.mle_baseline("cpo_an@0.9", {}) == "mle"  # the miniature's own runs


def test_synthetic_rejected_is_always_wrong():
    tok = tokenizer.byte_tokenizer()
    examples = data.load_task("synthetic", "train", tok, 48, n=3000)
    for e in examples:
        r = data.synthetic_rejected(e)
        assert r and r != e.response
    # and it is a pure function of the example
    first = [data.synthetic_rejected(e) for e in examples[:50]]
    assert first == [data.synthetic_rejected(e) for e in examples[:50]]
