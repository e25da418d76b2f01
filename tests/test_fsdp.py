"""train.py --fsdp (FSDP2 on 2 CPU ranks, gloo) and --activation_checkpointing: the same weights as one
process, exact resume after SIGKILL, and a final/ folder that transformers loads. Every run is tiny and
launched once (cached below): six torchrun launches in all."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

import hf
from model import ModelConfig, Transformer
from test_plan import saved_activation_bytes
from test_train import ROOT, SINGLE, assert_weights_close, run, weights

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--max_len=40", "--n_train=256", "--n_val=16",
        "--lr=1e-3",
        "--batch_size=16", "--micro_batch_size=4",  # one process: 4 micro-steps; 2 ranks: 2 each
        "--log_interval=1", "--eval_interval=0", "--device=cpu", "--steps=5", "--ckpt_interval=2"]
OBJECTIVES = {"mle": ["--objective=mle"],
              "cpo": ["--objective=cpo", "--negatives=bn:2,mn:2,tn:2"]}  # cpo: MixN
_done = {}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def final(out, name, args, nproc=1):
    """Run once per test session; -> the run's final/ folder."""
    if name not in _done:
        run([*TINY, *args, f"--out_dir={out / name}"], nproc=nproc)
        _done[name] = out / name / "final"
    return _done[name]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("objective", ["mle", "cpo"])
def test_fsdp_on_two_ranks_matches_one_process(out, objective, checkpointing):
    one = final(out, f"one_{objective}", OBJECTIVES[objective])
    extra = ["--activation_checkpointing"] if checkpointing else []
    two = final(out, f"fsdp_{objective}_{checkpointing}", [*OBJECTIVES[objective], "--fsdp", *extra], nproc=2)
    assert_weights_close(weights(one), weights(two), atol=1e-5)


def test_fsdp_sigkill_then_resume_is_bit_identical(out):
    straight = final(out, "fsdp_cpo_False", [*OBJECTIVES["cpo"], "--fsdp"], nproc=2)
    args = [*TINY, *OBJECTIVES["cpo"], "--fsdp", f"--out_dir={out / 'killed'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", SINGLE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own process group, so that SIGKILL reaches torchrun and both ranks at once, as a lost node would
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("saved") and "ckpt-" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out / "killed" / "final")
    resumed = run([*args, "--resume"], nproc=2)
    assert "resumed from" in resumed.stdout
    a, b = weights(straight), weights(out / "killed" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed FSDP run differs"


def test_fsdp_final_folder_loads_in_transformers_with_our_logits(out):
    folder = final(out, "fsdp_cpo_False", [*OBJECTIVES["cpo"], "--fsdp"], nproc=2)
    ours, _ = hf.load(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(model_type):
    """One process: recomputing each block in the backward changes the memory, not the numbers."""
    gpt2 = model_type == "gpt2"
    cfg = ModelConfig(model_type=model_type, vocab_size=64, n_layer=3, n_head=4, n_kv_head=4 if gpt2 else 2,
                      n_embd=32, n_inner=64, max_seq_len=32, tie_word_embeddings=gpt2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (3, 16))
    grads = []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        model.checkpoint_blocks = on
        model(ids).float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_keeps_only_block_inputs():
    """The saved tensors of the forward shrink to about one float32 (B, T, C) input per block."""
    cfg = ModelConfig(model_type="gpt2", vocab_size=64, n_layer=4, n_head=4, n_kv_head=4, n_embd=64,
                      n_inner=256, max_seq_len=64)
    model, ids = Transformer(cfg), torch.randint(0, 64, (4, 64))
    saved = {}
    for on in (False, True):
        model.checkpoint_blocks = on
        saved[on] = saved_activation_bytes(model, ids)
    assert saved[True] < saved[False] / 4, saved
