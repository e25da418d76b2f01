"""train.py: DDP equivalence, exact resume, the CPO gradient, NaN handling, and the embedded default."""
import dataclasses
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import checkpoint
import data
import hf
import negatives
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny CPU run; as a train.Config: the tiny_config fixture (tests/conftest.py)
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--max_len=40", "--n_train=256", "--n_val=16",
        "--batch_size=8", "--micro_batch_size=4", "--lr=1e-3", "--log_interval=1", "--eval_interval=0",
        "--device=cpu"]
CPO = ["--objective=cpo", "--negatives=bn:2,mn:2,tn:2", "--ranked"]

SINGLE = os.path.join(ROOT, "tests", "single_run_preset.py")  # one run, no stages
# the default preset, named explicitly: its stages run, with the flags applied to each
DEFAULT = os.path.join(ROOT, "config", "default.py")


def run(args, nproc=1, check=True, preset=SINGLE):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [preset, *args] if preset else args
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def weights(folder):
    m, _ = hf.load(folder)
    return m.state_dict()


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= atol, f"{k}: max abs difference {diff} > {atol}"


@pytest.mark.parametrize("objective", [["--objective=mle"], CPO])
def test_two_ranks_match_one_process(tmp_path, objective):
    """torchrun with 2 CPU ranks (gloo) reaches the weights of 1 process with the same global batch."""
    run([*TINY, *objective, "--steps=5", "--ckpt_interval=0", f"--out_dir={tmp_path / 'one'}"])
    run([*TINY, *objective, "--steps=5", "--ckpt_interval=0", f"--out_dir={tmp_path / 'two'}"], nproc=2)
    assert_weights_close(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"), atol=1e-5)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    args = [*TINY, *CPO, "--steps=8", "--ckpt_interval=2"]
    run([*args, f"--out_dir={tmp_path / 'straight'}"])
    # the same run, killed with SIGKILL as soon as its first checkpoint is announced
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", SINGLE, *args, f"--out_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if line.startswith("saved") and "ckpt-" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "final")
    out = run([*args, f"--out_dir={tmp_path / 'killed'}", "--resume"])
    assert "resumed from" in out.stdout
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "killed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config(objective="mle", steps=6, ckpt_interval=2, out_dir=str(tmp_path / "run"))
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "ckpt-0000004" in str(path):
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.checkpoints(cfg.out_dir) == [os.path.join(cfg.out_dir, "ckpt-0000002")]
    assert os.path.isdir(os.path.join(cfg.out_dir, "ckpt-0000004.tmp"))  # the torn write, ignored
    weights(os.path.join(cfg.out_dir, "ckpt-0000002", "model"))  # the previous checkpoint still loads
    train.train(replace(cfg, resume=True))
    train.train(replace(cfg, out_dir=str(tmp_path / "straight")))
    a, b = weights(tmp_path / "run" / "final"), weights(tmp_path / "straight" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def hand_logp(model, ids, mask):
    """log pi(y|x) of one sequence by a plain loop over its continuation tokens."""
    logits = model(ids[None])[0].log_softmax(-1)  # (T, V)
    return sum(logits[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])


@pytest.mark.parametrize("shared_prompt", [False, True])
@pytest.mark.parametrize("ranked", [False, True])
def test_cpo_step_gradient_matches_hand_written_formula(ranked, shared_prompt, tiny_config, perturb):
    # the shared-prompt forward sums the prompt's gradient over K continuations in another order: float32
    # rounding of near-zero gradient entries then differs by a few 1e-5, hence its looser atol
    cfg = tiny_config(objective="cpo", negatives="bn:2,mn:2,tn:2", ranked=ranked, beta=5.0)
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    perturb(policy)  # the policy differs from the reference, so the rewards are not all 0
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=4, seed=0)
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id,
                       shared_prompt=shared_prompt)
    loss_sum, _ = train.cpo_objective(cfg, policy, ref, examples, rt)
    (loss_sum / len(examples)).backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    # the negatives as train.cpo_batch draws them: step 0's generator, MN from pi_theta
    ids, mask, valid, _ = negatives.build_cpo_batch(
        examples, cfg.negatives, ref, pad_id=tok.pad_id, eos_id=tok.eos_id,
        generator=train.negatives_generator(cfg, 0), ranked=ranked, mn_model=policy)
    B, K, _ = ids.shape
    total = 0
    for b in range(B):
        seqs = [(ids[b, k], mask[b, k]) for k in range(K) if valid[b, k]]
        r = [cfg.beta * (hand_logp(policy, *s) - hand_logp(ref, *s).detach()) for s in seqs]
        if ranked:  # eq. (2)
            total = total - sum(r[k] - torch.logsumexp(torch.stack(r[k:]), 0) for k in range(len(r)))
        else:  # eq. (1)
            total = total - (r[0] - torch.logsumexp(torch.stack(r), 0))
    (total / B).backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-4 if shared_prompt else 1e-5, rtol=1e-4,
                                   msg=lambda m: f"{n}: {m}")


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    out = run([*TINY, "--objective=mle", "--steps=6", "--ckpt_interval=1", "--lr=1e30", "--grad_clip=0",
               f"--out_dir={tmp_path}"], check=False)
    assert out.returncode != 0
    said = "stopped before the update" in out.stderr and "Last good checkpoint" in out.stderr
    assert said, out.stderr[-2000:]
    last = checkpoint.checkpoints(str(tmp_path))[-1]
    assert last in out.stderr
    weights(os.path.join(last, "model"))  # intact and loadable


def test_default_pipeline_prints_table(tmp_path):
    """`python train.py`, shortened (the default preset named, so flags do not make it one run): every stage
    runs a few steps, then the comparison table."""
    args = ["--steps=3", "--n_train=128", "--n_val=8", "--micro_batch_size=32", f"--out_dir={tmp_path}"]
    out = run(args, preset=DEFAULT)
    for stage in ("ref", "mle", "cpo"):
        assert f"=== stage {stage}" in out.stdout and os.path.isdir(tmp_path / stage / "final")
    assert "| model | exact_match | correct_stop" in out.stdout
    assert "| cpo |" in out.stdout
    again = run(args, preset=DEFAULT)
    assert "already trained" in again.stdout  # a rerun continues the pipeline instead of starting over


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name}" in out.stdout


def test_every_preset_resolves():
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if name.endswith(".py") and name != "paper.py":
            config, stages = train.load_preset(os.path.join(ROOT, "config", name))
            train.Config(**config)
            for overrides in stages.values():
                train.Config(**{**config, **overrides})


def test_cpo_example_without_valid_negative_sits_out_the_step(tiny_config, perturb):
    """An example whose continuation is a bare EOS has no truncation negative: it adds nothing to the loss
    while the other examples train as usual."""
    cfg = tiny_config(objective="cpo", negatives="tn:2")
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=3, seed=0)
    bare = replace(examples[0], id="bare", continuation_ids=[tok.eos_id])
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id)
    perturb(policy)
    with_bare, _ = train.cpo_objective(cfg, policy, ref, [bare] + examples, rt)
    without, _ = train.cpo_objective(cfg, policy, ref, examples, rt)
    torch.testing.assert_close(with_bare, without)
    alone, _ = train.cpo_objective(cfg, policy, ref, [bare], rt)
    assert alone.item() == 0.0



def test_an_experiment_or_a_missing_preset_is_refused_in_one_line():
    """experiments/*.py are miniature.py's; config/study.py moved there: train.py names the command."""
    for preset, words in [("experiments/study.py", "python miniature.py --config experiments/study.py"),
                          ("config/study.py", "python miniature.py --config experiments/study.py"),
                          ("config/no_such_preset.py", "no such preset file")]:
        out = run([], check=False, preset=preset)  # relative to the repository, as a user types it
        assert out.returncode != 0 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
