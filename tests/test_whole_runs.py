"""Whole runs as they are launched: several epochs, on 2 gloo ranks, in every distributed mode a preset
ships (DDP, --fsdp, --fsdp --activation_checkpointing), with every negative kind (AN from a cache, BN, MN, TN,
MixN ranked) and DPO, against one process; a SIGKILL in epoch 2 of an FSDP AN run, then --resume; and the
negatives redrawn every step, the same for any world size and micro-batch split.
Swapped for what cannot exist here: the model (a 1-layer GPT-2 of width 32 on the byte tokenizer) and
the data (the synthetic task, 8 examples: an epoch is 2 steps of 4). One torchrun launch per mode runs
all six runs."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import data
import negatives
import train
from common import write_jsonl_atomic
from test_train import ROOT, assert_weights_close, weights
from whole_run_driver import BASE, MODES, RUNS

DRIVER = os.path.join(ROOT, "tests", "whole_run_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(start, out, mode, names, nproc):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    prefix = [sys.executable] if nproc == 1 else torchrun
    cmd = [*prefix, DRIVER, str(start), str(out), mode, *names]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The shared inputs: a starting model (one MLE step from scratch: pi_ref of every run), its AN cache
    and DPO's rejected answers, written as miniature.py writes them."""
    root = tmp_path_factory.mktemp("whole_runs")
    cfg = train.Config(**{**BASE, "init_from": "scratch", "n_layer": 1, "n_head": 2, "n_embd": 32,
                          "steps": 1, "ckpt_interval": 0, "micro_batch_size": 4,
                          "out_dir": str(root / "start")})
    final = train.train(cfg)
    negatives.write_an_negatives(final, "synthetic", str(root / "an"), split="train", spec="an:2", seed=0,
                                 limit=BASE["n_train"], max_len=BASE["max_len"], max_new_tokens=12,
                                 device="cpu")
    examples = data.load_task("synthetic", "train", train.byte_tokenizer(), BASE["max_len"],
                              n=BASE["n_train"], seed=0)
    rejected = [{"id": e.id, "rejected": data.synthetic_rejected(e)} for e in examples]
    write_jsonl_atomic(str(root / "rejected.jsonl"), rejected)
    return root


@pytest.fixture(scope="module")
def one_process(start):
    """Every run in one process: micro-batches of 2, accumulated twice."""
    out = start / "one"
    cmd = [sys.executable, "-c", (
        "import sys; sys.path.insert(0, 'tests'); import train; from whole_run_driver import whole_run\n"
        f"for name in {list(RUNS)!r}:\n"
        f"    train.train(whole_run({str(start)!r}, {str(out)!r} + '/' + name, 'ddp', name,"
        " micro_batch_size=2))")]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(start):
    """Every mode: one torchrun launch of 2 ranks running all six runs; -> {mode: that launch's output}."""
    return {mode: launch(start, start / "two", mode, list(RUNS), nproc=2).stdout for mode in MODES}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(RUNS))
def test_three_epochs_on_two_ranks_match_one_process(start, one_process, two_ranks, mode, name):
    assert f"step {BASE['steps']}/{BASE['steps']}" in two_ranks[mode]
    one = weights(one_process / name / "final")
    two = weights(start / "two" / f"{mode}_{name}" / "final")
    assert_weights_close(one, two, atol=1e-5)
    moved = max((one[k] - w).abs().max().item() for k, w in weights(start / "start" / "final").items())
    assert moved > 1e-4, f"the run hardly moved the weights ({moved}): the comparison would prove nothing"


def test_fsdp_an_run_killed_in_epoch_two_resumes_bit_identical(start, two_ranks):
    """SIGKILL to torchrun and both ranks (a lost node) once step 3's checkpoint is written (the driver
    sends it): step 3 is the first of epoch 2, where the reference cache starts to hit. Then --resume: the
    same bits as the run that was never stopped (two_ranks' fsdp_an)."""
    out = start / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", DRIVER,
           str(start), str(out), "fsdp", "an", "--ckpt_interval=1"]
    killed = subprocess.run([*cmd, "--die_after_checkpoint=3"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "step 3/6" in killed.stdout and "step 4/6" not in killed.stdout
    assert not (out / "fsdp_an" / "final").exists()
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 3" in resumed.stdout
    a, b = weights(start / "two" / "fsdp_an" / "final"), weights(out / "fsdp_an" / "final")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert same, "the resumed FSDP AN run differs"


# ----------------------------------------------------------------------------- negatives, redrawn each step

def step_negatives(examples, step, cfg, model):
    """{example id: its (K, T) ids} of a CPO batch made as train.cpo_batch makes it at `step`."""
    ids, mask, valid, _ = negatives.build_cpo_batch(
        examples, cfg.negatives, model, pad_id=0, eos_id=model.config.eos_id,
        generator=train.negatives_generator(cfg, step), allow_fewer=True,
        bn_pool=[e.continuation_ids for e in examples])
    return {e.id: [row[m].tolist() for row, m in zip(ids[i], mask[i])] for i, e in enumerate(examples)}


@pytest.fixture(scope="module")
def tiny_model():
    cfg = train.Config(**{**BASE, "init_from": "scratch", "n_layer": 1, "n_head": 2, "n_embd": 32})
    model, tok = train.build_model(cfg)
    return model.eval(), tok


def test_tn_and_mn_negatives_change_between_epochs(tiny_model):
    model, tok = tiny_model
    cfg = train.Config(**{**BASE, "objective": "cpo", "negatives": "mn:3,tn:3"})
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=cfg.n_train, seed=0)
    long_one = max(examples, key=lambda e: len(e.continuation_ids))  # room for several cuts and positions
    steps = {s: data.global_batch(s, len(examples), cfg.batch_size, cfg.seed) for s in range(6)}
    seen = [s for s, idx in steps.items() if examples.index(long_one) in idx]  # its steps, one per epoch
    assert len(seen) == 3
    a, b = (step_negatives([long_one], s, cfg, model)[long_one.id] for s in seen[:2])
    assert a[0] == b[0]  # the ground truth
    assert a[1:4] != b[1:4], "MN negatives are the same in two epochs"
    assert a[4:] != b[4:], "TN cut points are the same in two epochs"
    fixed = train.Config(**{**BASE, "objective": "cpo", "negatives": "mn:3,tn:3", "fixed_negatives": True})
    first, second = (step_negatives([long_one], s, fixed, model) for s in seen[:2])
    assert first == second  # --fixed_negatives: the same in every epoch


def test_a_steps_negatives_are_the_same_for_any_world_size_and_micro_batch(tiny_model):
    model, tok = tiny_model
    cfg = train.Config(**{**BASE, "objective": "cpo", "negatives": "bn:1,mn:2,tn:2"})
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=cfg.n_train, seed=0)
    step = 3
    indices = data.global_batch(step, len(examples), cfg.batch_size, cfg.seed)
    batch = [examples[i] for i in indices]
    by_split = {}
    for world in (1, 2):
        for micro in (1, 2):
            got = {}
            for rank in range(world):
                for chunk in data.micro_batches(indices, rank, world, micro):
                    ids, mask, valid, _ = negatives.build_cpo_batch(
                        [examples[i] for i in chunk], cfg.negatives, model, pad_id=0, eos_id=tok.eos_id,
                        generator=train.negatives_generator(cfg, step), allow_fewer=True,
                        bn_pool=[e.continuation_ids for e in batch])
                    for j, i in enumerate(chunk):
                        got[examples[i].id] = (ids[j][mask[j]].tolist(), valid[j].tolist())
            by_split[(world, micro)] = got
    assert len(by_split[(1, 1)]) == len(batch)
    for split, got in by_split.items():
        assert got == by_split[(1, 1)], f"world size, micro-batch {split}: other negatives"


# ----------------------------------------------------------------------------- --compile over a whole run

def test_a_three_epoch_compiled_cpo_run_compiles_a_few_graphs(tmp_path, caplog):
    """Every batch brings new lengths; dynamo marks the changing dims dynamic after the first recompile, so a
    run compiles a couple of graphs, not one per batch (a frame past the recompile limit runs eagerly from
    then on: a silent loss of the speed --compile was for)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    cfg = train.Config(**{**BASE, "init_from": "scratch", "n_layer": 1, "n_head": 2, "n_embd": 32,
                          "micro_batch_size": 2, "objective": "cpo", "negatives": "bn:1,mn:1,tn:1",
                          "ranked": True, "compile": True, "out_dir": str(tmp_path / "run")})
    with caplog.at_level("WARNING"):
        train.train(cfg)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4, f"{graphs} graphs compiled for {cfg.steps} steps"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
    torch._dynamo.reset()
