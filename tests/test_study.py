"""The "When does CPO help?" study (docs/study.md): its val split and long-answer task, the diagnostics every
CPO/DPO run logs, and the study's presets run end to end at --scale tiny (only the model, step and example
counts are swapped: every setting of the grid runs as written); H4's too, with the exposure-bias measure
(docs/exposure_bias.md) written per model, tabulated and charted, and added by a rerun without retraining."""
import json
import os
import subprocess
import sys

import pytest

import data
import miniature
import tokenizer
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def word(prompt):
    return prompt.rstrip("=").split(" ")[1]


def test_val_split_is_held_out_from_training_and_apart_from_test():
    train_words = {word(p) for p, _ in data.synthetic_pairs(5000, seed=0)}
    val = data.synthetic_pairs(500, seed=0, split="val")
    test = data.synthetic_pairs(500, seed=0, split="test")
    assert not {word(p) for p, _ in val} & train_words
    assert all(data.is_test_word(word(p)) for p, _ in val)  # the test words' pool, never trained on
    assert len(set(val) & set(test)) < 25  # a separate stream: shared only by chance (short words)
    assert data.synthetic_pairs(500, seed=0, split="val") == val


def test_long_task_has_long_answers_and_fits_its_window():
    pairs = data.synthetic_pairs(400, seed=0, split="train", word_len=data.SYNTHETIC_LONG_WORD_LEN)
    lengths = [len(a) for _, a in pairs]
    assert min(lengths) >= 10 and max(lengths) <= 80 and sum(lengths) / len(lengths) > 30
    assert data.synthetic_max_new_tokens("synthetic:long") == 81
    examples = data.load_task("synthetic:long", "test", tokenizer.byte_tokenizer(), 128, n=50)
    assert all(e.id.startswith("synthetic:long/test/0/") for e in examples)
    assert all(len(e.prompt_ids) + len(e.continuation_ids) <= 128 for e in examples)
    # the default task's examples are untouched by the variant (the README's numbers depend on them)
    assert data.synthetic_pairs(3, seed=0) == data.synthetic_pairs(3, seed=0, word_len=(3, 10))
    with pytest.raises(ValueError, match="synthetic or synthetic:long"):
        data.load_task("synthetic:huge", "train", tokenizer.byte_tokenizer(), 64)


@pytest.mark.parametrize("objective", ["cpo", "dpo"])
def test_contrastive_runs_log_their_diagnostics(tmp_path, objective, capsys):
    rejected = tmp_path / "rejected.jsonl"
    tok = tokenizer.byte_tokenizer()
    examples = data.load_task("synthetic", "train", tok, 40, n=64)
    rows = [{"id": e.id, "rejected": data.synthetic_rejected(e)} for e in examples]
    rejected.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train.Config(n_layer=1, n_head=2, n_embd=32, max_len=40, n_train=64, n_val=8, batch_size=8,
                       micro_batch_size=4, lr=1e-3, steps=3, log_interval=2, eval_interval=0, device="cpu",
                       objective=objective, negatives="bn:2,tn:1",
                       dpo_rejected=str(rejected) if objective == "dpo" else "",
                       out_dir=str(tmp_path / "run"))
    train.train(cfg)
    out = capsys.readouterr().out
    assert "step 1/3 |" in out and "step 2/3 |" in out and "step 3/3 |" in out
    assert "log pi truth" in out and "negatives" in out
    assert "held-out greedy outputs changed vs the reference" in out
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    first, last = records[0], records[2]
    assert first["reward_accuracy"] == 0 and abs(first["reward_margin"]) < 1e-4  # step 1 scores pi_ref itself
    assert first["logp_truth"] < 0 and first["logp_negatives"] < 0
    assert last["logp_truth"] != first["logp_truth"]
    assert 0 <= records[3]["changed_vs_ref"] <= 1


def test_mle_runs_log_no_contrastive_diagnostics(tmp_path, capsys):
    cfg = train.Config(n_layer=1, n_head=2, n_embd=32, max_len=40, n_train=64, n_val=8, batch_size=8,
                       micro_batch_size=8, steps=2, log_interval=1, eval_interval=0, device="cpu",
                       out_dir=str(tmp_path / "run"))
    train.train(cfg)
    assert "log pi truth" not in capsys.readouterr().out
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [set(r) for r in records] == [{"step", "loss", "lr"}] * 2


@pytest.mark.parametrize("preset", ["study.py", "study_long.py", "study_final.py", "study_long_2000.py",
                                    "h4_long.py", "h4_short.py"])
def test_study_presets_run_at_tiny_scale(tmp_path, preset):
    out = tmp_path / "study"
    cmd = [sys.executable, "miniature.py", "--config", os.path.join(ROOT, "experiments", preset),
           "--scale", "tiny", "--seeds", "0,1", "--jobs", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _, stages, experiment = miniature.miniature_settings(os.path.join(ROOT, "experiments", preset), "tiny")
    # the ensembles of the (one) CPO run with its MLE baseline: H4's presets have them, the study's do not
    alphas = [a for a in experiment["alphas"].split(",") if a]
    ensembles = [f"{n}@{a}" for n in stages if n.startswith("cpo") for a in alphas]
    table = (out / "results.md").read_text()
    assert f"({experiment['split']} split)" in table  # val while choosing, test only for the final table
    for name in stages:
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        if name.startswith("cpo"):  # judged against MLE with the same steps and lr
            assert f"| {experiment['baselines'][name]} |" in row
    results = json.loads((out / "results.json").read_text())
    assert {f"{s}/{n}" for s in (0, 1) for n in [*stages, *ensembles]} == set(results)
    for key, r in results.items():
        assert 0 <= r["sampled_exact_match"] <= 1
        if "/cpo" in key and "@" not in key:  # a trained CPO run, not an ensemble
            assert r["curve"][0]["step"] == 1 and "logp_negatives" in r["curve"][-1] and "changed_vs_ref" in r
    assert (out / "alpha.md").exists() == bool(ensembles)  # the study has no ensemble sweep
    if experiment.get("exposure"):
        check_exposure_outputs(out, stages, ensembles, experiment, run.stdout)
    if preset == "h4_short.py":  # a rerun on a folder scored before the measure existed only adds the measure
        rerun_adds_only_the_exposure_files(out, cmd, env)
    if preset == "study.py":  # H3's cache: the reference sampled at temperature 0.5, beside the T = 1 one
        meta = json.loads((out / "seed0" / "an_t0.5" / "meta.json").read_text())
        plain = json.loads((out / "seed0" / "an" / "meta.json").read_text())
        assert meta["temperature"] == 0.5 and "temperature" not in plain


def exposure_files(out):
    return sorted(out.glob("seed*/*/exposure.json")) + sorted(out.glob("seed*/alpha/exposure_*.json"))


def check_exposure_outputs(out, stages, ensembles, experiment, stdout):
    """H4's presets: every model of both seeds has its exposure-bias measure, cached beside its scores, in
    results.json, in results.md's bucket table and paired comparison (printed too), and exposure.svg."""
    assert len(exposure_files(out)) == 2 * (len(stages) + len(ensembles))
    for path in out.glob("seed*/alpha/exposure_*.json"):  # the ensembles': beside scores_<run>@<alpha>.json
        assert path.with_name(path.name.replace("exposure_", "scores_")).exists()
    results = json.loads((out / "results.json").read_text())
    for r in results.values():
        overall = r["exposure"]["overall"]
        assert overall["gap"] == pytest.approx(overall["tf"] - overall["fr"])
        assert r["exposure"]["buckets"]["0"]["gap"] == 0  # both see the prompt alone
    table = (out / "results.md").read_text()
    baseline = experiment["baselines"][next(n for n in stages if n.startswith("cpo"))]
    for name in [*stages, *ensembles]:
        assert f"| {name} | gap | 0.000 ± 0.000 |" in table and f"| {name} | gap |" in stdout
        if name != "ref" and name != baseline:
            for metric in ("exact_match", "exposure gap", "FR token accuracy"):
                assert f"| {name} | {baseline} | {metric} |" in table
    svg = (out / "exposure.svg").read_text()
    assert svg.startswith("<svg") and "ref TF" in svg


def rerun_adds_only_the_exposure_files(out, cmd, env):
    kept = sorted(out.glob("seed*/*/final/model.safetensors")) + sorted(out.glob("seed*/*/scores.json")) \
        + sorted(out.glob("seed*/alpha/scores_*.json"))
    stamps = [p.stat().st_mtime_ns for p in kept]
    before = json.loads((out / "results.json").read_text())
    for path in exposure_files(out) + [out / "exposure.svg"]:
        path.unlink()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    after = json.loads((out / "results.json").read_text())
    assert {k: r["exposure"] for k, r in after.items()} == {k: r["exposure"] for k, r in before.items()}
    assert (out / "exposure.svg").exists()
