"""The paper's runs as shipped (issue #13): every preset matches the paper and runs one step unmodified on a
tiny stand-in; BN from the global batch; float32 master weights from 16-bit checkpoints; MN from pi_theta."""
import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

import data
import evaluate
import hf
import miniature
import model as modeling
import negatives
import train
from preset_driver import SWAPPED, as_shipped, shipped
from test_train import ROOT
from tokenizer import byte_tokenizer

PRESETS = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "config"))
                 if n.endswith(".py") and n not in ("paper.py", "default.py"))
BN_PRESETS = [n for n in PRESETS if "bn" in shipped(n).negatives and shipped(n).objective == "cpo"]

# ------------------------------------------------------------------------- the presets say what the paper did

# name: (steps, starting model, objective, negatives, ranked): §4 and Table 1 (GPT2-XL and OpenLlama-3B on
# Dolly), Table 2 (MLE_1, ANR and AN 200 steps, the rest 1000), Figure 1 / §5.1 (MLE 1000 steps, then 4
# negatives, ranked, 200 steps), §5.2 (Wikipedia: MLE and BNR).
SFT, SFT1000 = "out/{}_sft/final", "out/dolly_llama3b_sft1000/final"
PAPER = {
    "dolly_gpt2xl_sft": (2000, "gpt2-xl", "mle", None, None),
    "dolly_gpt2xl_mle": (1000, SFT, "mle", None, None),
    "dolly_gpt2xl_pss": (1000, SFT, "pss", None, None),
    "dolly_gpt2xl_dpo": (1000, SFT, "dpo", None, None),
    "dolly_gpt2xl_anr": (1000, SFT, "cpo", "an:11", True),
    "dolly_gpt2xl_mixnr": (1000, SFT, "cpo", "bn:3,mn:5,tn:3", True),
    "dolly_llama3b_sft": (2000, "openlm-research/open_llama_3b", "mle", None, None),
    "dolly_llama3b_mle": (1000, SFT, "mle", None, None),
    "dolly_llama3b_mle1": (200, SFT, "mle", None, None),
    "dolly_llama3b_pss": (1000, SFT, "pss", None, None),
    "dolly_llama3b_dpo": (1000, SFT, "dpo", None, None),
    "dolly_llama3b_anr": (200, SFT, "cpo", "an:11", True),
    "dolly_llama3b_an": (200, SFT, "cpo", "an:11", False),
    "dolly_llama3b_mixnr": (1000, SFT, "cpo", "bn:3,mn:5,tn:3", True),
    "dolly_llama3b_mixn": (1000, SFT, "cpo", "bn:3,mn:5,tn:3", False),
    "dolly_llama3b_sft1000": (1000, "openlm-research/open_llama_3b", "mle", None, None),
    "dolly_llama3b_mle200": (200, SFT1000, "mle", None, None),
    "dolly_llama3b_bnr4": (200, SFT1000, "cpo", "bn:4", True),
    "dolly_llama3b_tnr4": (200, SFT1000, "cpo", "tn:4", True),
    "dolly_llama3b_mnr4": (200, SFT1000, "cpo", "mn:4", True),
    "wiki_llama3b_sft": (2000, "openlm-research/open_llama_3b", "mle", None, None),
    "wiki_llama3b_mle": (1000, SFT, "mle", None, None),
    "wiki_llama3b_bnr": (1000, SFT, "cpo", "bn:4", True),
}


def test_every_run_of_the_paper_has_a_preset():
    assert set(PRESETS) == set(PAPER)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_the_papers_run(name):
    cfg = shipped(name)
    steps, start, objective, spec, ranked = PAPER[name]
    family = name.rsplit("_", 1)[0]  # e.g. dolly_gpt2xl: its SFT run is out/dolly_gpt2xl_sft
    assert (cfg.steps, cfg.init_from, cfg.objective) == (steps, start.format(family), objective)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.beta) == (1e-5, 0.05, 64, 5.0)
    assert cfg.out_dir == f"out/{name}" and cfg.task.split(":")[0] == name.split("_")[0]
    if objective == "cpo":
        assert (cfg.negatives, cfg.ranked, cfg.mn_model) == (spec, ranked, "policy")
    if objective == "pss":
        assert (cfg.pss_samples, cfg.pss_p) == (3, 0.5)


def test_readme_table_lists_every_preset_with_its_steps_and_start():
    """The preset table of docs/paper_runs.md (the README links it): a row per preset, its steps and start."""
    page = open(os.path.join(ROOT, "docs", "paper_runs.md")).read()
    for name, (steps, start, *_) in PAPER.items():
        rows = [line for line in page.splitlines() if line.startswith("|") and f"`config/{name}.py`" in line]
        row = rows[0] if rows else None
        where = f"docs/paper_runs.md, the row of config/{name}.py"
        assert row is not None, f"{where}: missing"
        cells = [c.strip() for c in row.split("|")]
        assert str(steps) in cells, f"{where}: steps {steps} not in {cells}"
        assert f"`{start.format(name.rsplit('_', 1)[0])}`" in row, f"{where}: start {start} missing"

# ------------------------------------------------------------------------- every preset, as shipped, one step


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny models of each family (byte tokenizer), Dolly- and Wiki-format files, an AN cache per family
    and DPO rejected responses: what the presets need, in miniature. 200 Dolly rows: over 64 distinct
    training answers."""
    tmp = tmp_path_factory.mktemp("presets")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    tiny = dict(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, n_inner=32,
                max_seq_len=96, bos_id=None, eos_id=tok.eos_id)
    families = {"gpt2": dict(model_type="gpt2"), "llama": dict(model_type="llama", n_kv_head=1)}
    for family, cfg in families.items():
        config = modeling.ModelConfig(**{**tiny, **cfg})
        hf.save_pretrained(modeling.Transformer(config), str(tmp / family), tok)
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]
    rows = [{"instruction": f"say {words[i % 10]}", "context": "" if i % 2 else f"w {i}",
             "response": f"{words[i % 10]} {i}", "category": "x"} for i in range(200)]
    (tmp / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": f"document {i} " + "lorem ipsum " * (3 + i % 5)} for i in range(200)]
    (tmp / "wiki.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    train_set = data.load_task(f"dolly:{tmp / 'dolly.jsonl'}", "train", tok, 64)
    rejected = [{"id": e.id, "rejected": "no"} for e in train_set]
    (tmp / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    for family in ("gpt2", "llama"):
        negatives.main(["--model", str(tmp / family), "--data", f"dolly:{tmp / 'dolly.jsonl'}",
                        "--spec", "an:11", "--out", str(tmp / f"an_{family}"), "--max-new-tokens", "6",
                        "--max-len", "64", "--device", "cpu"])
    return tmp


def assert_ran_as_shipped(name, out_dir):
    """The run's config.json is the preset's own, but for the swapped settings; it reached final/."""
    written = json.load(open(os.path.join(out_dir, "config.json")))
    ours = {k: v for k, v in asdict(shipped(name)).items() if k not in SWAPPED}
    assert {k: v for k, v in written.items() if k not in SWAPPED} == ours
    assert os.path.isfile(os.path.join(out_dir, "final", "config.json"))


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in BN_PRESETS])
def test_preset_runs_one_step_as_shipped(name, stand_ins, tmp_path):
    train.train(as_shipped(name, str(stand_ins), str(tmp_path)))
    assert_ran_as_shipped(name, tmp_path)


def test_bn_presets_run_one_step_as_shipped_on_two_ranks(stand_ins, tmp_path):
    """All BN presets in one torchrun launch of 2 CPU ranks: micro-batch 2, 16 micro-steps per rank, a
    global batch of 64."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "preset_driver.py"), str(stand_ins), str(tmp_path), *BN_PRESETS]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("2 rank(s) x 16 micro-steps x 2 = global batch 64") == len(BN_PRESETS)
    for name in BN_PRESETS:
        assert_ran_as_shipped(name, tmp_path / name)

# ----------------------------------------------------------------------------- BN: the global batch


def bn_negatives_by_split(cfg, train_set, policy, ref, tok, world, micro):
    """{position in the global batch: its BN negatives} when step 0's batch is split over `world`
    ranks in micro-batches of `micro`, exactly as train() splits it (data.micro_batches) and wires
    it (train.cpo_batch)."""
    indices = data.global_batch(0, len(train_set), cfg.batch_size, cfg.seed)
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id, ref_cache=None,
                       batch=[train_set[i] for i in indices])
    out = {}
    for rank in range(world):
        chunks = data.micro_batches(indices, rank, world, micro)
        for m, chunk in enumerate(chunks):
            ids, mask, valid, _ = train.cpo_batch(cfg, policy, ref, [train_set[i] for i in chunk], rt)
            first = (rank * len(chunks) + m) * micro
            for b in range(len(chunk)):  # cfg.negatives is "bn:N", unranked: columns 1..N are BN
                out[first + b] = [ids[b, k][mask[b, k]].tolist()
                                  for k in range(1, ids.shape[1]) if valid[b, k]]
    return out


def test_bn_negatives_do_not_depend_on_micro_batch_or_world_size(stand_ins):
    cfg = replace(as_shipped("dolly_llama3b_mixn", str(stand_ins), ""), negatives="bn:3")
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    train_set = data.load_task(cfg.task, "train", tok, cfg.max_len)
    one = bn_negatives_by_split(cfg, train_set, policy, ref, tok, world=1, micro=64)
    assert len(one) == 64 and all(len(v) == 3 for v in one.values())
    assert one == bn_negatives_by_split(cfg, train_set, policy, ref, tok, world=1, micro=2)
    assert one == bn_negatives_by_split(cfg, train_set, policy, ref, tok, world=2, micro=2)
    batch = data.global_batch(0, len(train_set), 64, cfg.seed)
    truths = {tuple(train_set[i].continuation_ids) for i in batch}
    micro0 = {tuple(train_set[i].continuation_ids) for i in batch[:2]}
    drawn = {tuple(c) for v in one.values() for c in v}
    # from the whole global batch, not the 2-example micro-batch
    assert drawn <= truths and not drawn <= micro0


def test_repeated_examples_leave_bn_columns_invalid_and_an_impossible_spec_is_refused(
        tmp_path, capsys, tiny_config):
    """7 examples, batch 8: every batch repeats one, and bn:6 can't be filled for every row. The run goes on
    and says so; bn:7 (7 distinct answers: at most 6 others) is refused before training."""
    cfg = tiny_config(objective="cpo", negatives="bn:6", n_train=7, batch_size=8, micro_batch_size=2,
                      steps=2, ckpt_interval=0, out_dir=str(tmp_path / "a"))
    train.train(cfg)
    assert "BN columns left invalid" in capsys.readouterr().out
    with pytest.raises(ValueError, match="7 batch negatives asked for"):
        train.train(replace(cfg, negatives="bn:7", out_dir=str(tmp_path / "b")))

# ----------------------------------------------------------------------------- float32 master weights


def tiny_checkpoint(folder, dtype, seed=0):
    """A tiny GPT-2 whose weights are representable in `dtype`, saved in `dtype` (hf.save_pretrained writes
    torch_dtype as HF does)."""
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    config = modeling.ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, n_layer=2, n_head=2,
                                  n_kv_head=2, n_embd=32, n_inner=64, max_seq_len=64, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id)
    m = modeling.Transformer(config)
    hf.save_pretrained(m.to(dtype), str(folder), tok)
    return str(folder)


def ckpt_weights(out_dir, step):
    return hf.load(os.path.join(out_dir, f"ckpt-{step:07d}", "model"))[0].state_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_trains_in_float32(dtype, tmp_path, tiny_config):
    half = tiny_checkpoint(tmp_path / "half", dtype)
    start, _ = hf.load(half)
    full = tmp_path / "full"
    hf.save_pretrained(start.float(), str(full), byte_tokenizer())  # the same weights, stored as float32
    runs = {}
    for name, init in [("half", half), ("full", str(full))]:
        cfg = tiny_config(objective="mle", init_from=init, lr=1e-5, steps=3, ckpt_interval=0,
                          out_dir=str(tmp_path / f"run_{name}"))
        train.train(cfg)
        runs[name] = ckpt_weights(cfg.out_dir, 3)
    start = start.float().state_dict()
    # ckpt-N: float32 for exact resume
    assert all(runs["half"][k].dtype == torch.float32 for k in runs["half"])
    assert any(not torch.equal(runs["half"][k], start[k]) for k in start), "lr 1e-5 moved no parameter"
    for k in start:
        assert torch.isfinite(runs["half"][k]).all(), k
        torch.testing.assert_close(runs["half"][k], runs["full"][k], rtol=1e-5, atol=0, msg=k)
    assert json.load(open(tmp_path / "run_half" / "final" / "config.json"))["torch_dtype"] == str(dtype)[6:]
    assert json.load(open(tmp_path / "run_half" / "final" / "nanocpo.json")) == {"max_len": cfg.max_len}


def test_resume_from_a_bf16_start_is_bit_identical(tmp_path, tiny_config):
    init = tiny_checkpoint(tmp_path / "bf16", torch.bfloat16)
    cfg = tiny_config(objective="cpo", negatives="bn:2,mn:2,tn:1", init_from=init, lr=1e-5, ckpt_interval=2,
                      save_dtype="float32")
    train.train(replace(cfg, steps=4, out_dir=str(tmp_path / "straight")))
    train.train(replace(cfg, steps=2, out_dir=str(tmp_path / "stopped")))
    train.train(replace(cfg, steps=4, out_dir=str(tmp_path / "stopped"), resume=True))
    a, b = ckpt_weights(tmp_path / "straight", 4), ckpt_weights(tmp_path / "stopped", 4)
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same, "resumed bf16-start run differs from the uninterrupted one"

# ----------------------------------------------------------------------------- MN from pi_theta


def mn_columns(cfg, policy, ref, examples, rt):
    """The MN negatives of a batch whose spec begins with mn:3, unranked (columns 1..3)."""
    ids, mask, valid, _ = train.cpo_batch(cfg, policy, ref, examples, rt)
    return ids[:, 1:4]


def test_mn_samples_from_the_current_policy_and_the_ref_option_works(tmp_path, tiny_config, perturb):
    cfg = tiny_config(objective="cpo", negatives="mn:3,tn:1", ranked=False)
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=4, seed=0)
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id)
    before = mn_columns(cfg, policy, ref, examples, rt)
    perturb(ref, seed=1, scale=0.5)
    assert torch.equal(mn_columns(cfg, policy, ref, examples, rt), before)  # pi_ref doesn't matter
    perturb(policy, seed=2, scale=0.5)
    after = mn_columns(cfg, policy, ref, examples, rt)
    assert not torch.equal(after, before)  # the policy's new weights give new samples
    as_ref = replace(cfg, mn_model="ref")
    from_ref = mn_columns(as_ref, policy, ref, examples, rt)
    perturb(policy, seed=3, scale=0.5)
    # --mn_model=ref: the policy doesn't matter
    assert torch.equal(mn_columns(as_ref, policy, ref, examples, rt), from_ref)
    perturb(ref, seed=4, scale=0.5)
    assert not torch.equal(mn_columns(as_ref, policy, ref, examples, rt), from_ref)
    # policy samples are never cached (new every step); pi_ref samples are, once per distinct sequence
    train.cpo_objective(cfg, policy, ref, examples, rt)
    assert len(rt.ref_cache.entries) <= len(examples)  # the ground truths only: negatives are drawn afresh
    rt.ref_cache = train.scoring.ReferenceCache()
    train.cpo_objective(replace(as_ref, fixed_negatives=True), policy, ref, examples, rt)
    assert len(rt.ref_cache.entries) > 2 * len(examples)  # fixed negatives from pi_ref come back: cached
    # a run with --mn_model=ref
    train.train(replace(as_ref, steps=1, ckpt_interval=0, out_dir=str(tmp_path)))

# ----------------------------------------------------------------------------- every README command parses


class Parsed(Exception):
    """Raised where a command would start its work: its arguments parsed and checked."""


def readme_commands():
    """(script, argv) of every python/torchrun command in the bash blocks of README.md and docs/*.md (every
    command people copy): continuation lines joined, comments dropped, $T expanded, `for run in a b; do CMD;
    done` unrolled. pip and pytest lines are left out."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    text = "\n".join(open(p, encoding="utf-8").read() for p in pages)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or line.startswith("pip "):
                continue
            if m := re.fullmatch(r'(\w+)="(.*)"', line):
                env[m[1]] = m[2]
                continue
            for k, v in env.items():
                line = line.replace(f"${k}", v)
            loop = re.fullmatch(r"for (\w+) in (.*?); do (.*); done", line)
            lines = [loop[3].replace(f"${loop[1]}", v) for v in loop[2].split()] if loop else [line]
            for cmd in map(shlex.split, lines):
                script = next(i for i, w in enumerate(cmd) if w.endswith(".py") or w == "-m")
                if cmd[script] != "-m":
                    out.append((cmd[script], cmd[script + 1:]))
    return out


def test_every_readme_command_parses(monkeypatch):
    commands = readme_commands()
    assert {s for s, _ in commands} >= {"train.py", "evaluate.py", "negatives.py", "miniature.py"}
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        if not hasattr(ns, "func"):
            raise Parsed(ns)
        ns.func = lambda a: (_ for _ in ()).throw(Parsed(a))  # evaluate.py: its own checks run first
        return ns

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for script, argv in commands:
        if script == "train.py":
            try:
                preset, flags = train.parse_args(argv)
            except Parsed as e:
                ns = e.args[0]
                preset = ns.preset
                flags = {k: v for k, v in vars(ns).items() if k != "preset" and v is not None}
            except SystemExit as e:
                assert argv == ["--help"] and e.code == 0, (script, argv)
                continue
            config, stages = train.load_preset(os.path.join(ROOT, preset or "config/default.py"))
            for overrides in [{}, *stages.values()]:
                train.Config(**{**config, **overrides, **flags})
            continue
        mains = {"evaluate.py": evaluate.main, "negatives.py": negatives.main, "miniature.py": miniature.main}
        if script not in mains:  # a script without a command line (cpo.py's self-check, examples/): run bare
            assert argv == [] and os.path.isfile(os.path.join(ROOT, script)), (script, argv)
            continue
        with pytest.raises(Parsed):
            mains[script](argv)

# ----------------------------------------------------------------------------- one length rule


def test_generate_reads_the_training_max_len_and_cuts_wiki_references(tmp_path):
    folder = tiny_checkpoint(tmp_path / "model", torch.float32)  # context 64
    net, tok = hf.load(folder)
    assert hf.window_len(folder, net) == 64 and hf.window_len(folder, net, 30) == 30
    (tmp_path / "model" / hf.RUN_FILE).write_text(json.dumps({"max_len": 40}))  # as train.py writes final/
    assert hf.window_len(folder, net) == 40 and hf.window_len(folder, net, 30) == 30
    docs = [{"text": f"doc {i} " + "lorem ipsum dolor " * 12} for i in range(20)]
    (tmp_path / "wiki.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task, out = f"wiki:{tmp_path / 'wiki.jsonl'}", tmp_path / "gens.jsonl"
    evaluate.main(["generate", "--model", folder, "--task", task, "--split", "all", "--n", "0",
                   "--out", str(out), "--max-new-tokens", "5"])
    rows = {r["id"]: r for r in map(json.loads, open(out))}
    examples = {e.id: e for e in data.load_task(task, "all", tok, 40)}  # training's windows at max_len 40
    assert rows.keys() == examples.keys()
    for i, e in examples.items():
        assert rows[i]["prompt"] == e.prompt
        assert rows[i]["reference"] == tok.decode(e.continuation_ids[:5]) and len(e.continuation_ids) > 5
