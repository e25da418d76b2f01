"""examples/cpo_transformers.py: it runs, its loss on a batch is the loss train.py's building blocks give on
the same weights, and transformers' last hidden state is the final-normed one its memory-safe path needs."""
import copy
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import cpo
import hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "cpo_transformers.py")


def load_example():
    spec = importlib.util.spec_from_file_location("cpo_transformers", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_example_runs_and_its_loss_falls(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--steps", "4"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in out.stdout.splitlines()]
    assert len(losses) == 4
    assert losses[0] == pytest.approx(math.log(5), abs=1e-4)  # pi_theta = pi_ref: every r(y) = 0, K = 5
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("ranked", [False, True])
def test_the_example_loss_is_train_pys_loss(tmp_path, ranked, perturb):
    example = load_example()
    torch.manual_seed(0)
    policy, encode, eos_id = example.load()
    policy.eval().double()  # float64: the two paths' sums then agree far inside the tolerance
    ref = copy.deepcopy(policy)
    perturb(policy, seed=0, scale=0.05)  # a policy that has moved away from pi_ref: the loss is not log K
    g = torch.Generator().manual_seed(0)
    ids, mask, valid = example.make_batch(example.PAIRS, encode, eos_id, generator=g)  # 2 TN, 2 BN each
    B, K, T = ids.shape
    assert K == 5 and valid.all()
    loss, _ = example.cpo_step_loss(policy, ref, ids, mask, valid, beta=5.0, ranked=ranked)

    # train.py's path: the same weights in the repo's own Transformer (hf.load), log pi(y|x) from its final
    # hidden states and lm_head, cpo_loss averaged over the batch
    def train_logps(model):
        flat_ids, flat_mask = ids.view(B * K, T), mask.view(B * K, T)
        hidden = model(flat_ids[:, :-1], return_hidden=True)  # (N, T-1, C)
        return cpo.sequence_logprobs_from_hidden(hidden, model.lm_head.weight, flat_ids[:, 1:],
                                                 flat_mask[:, 1:]).view(B, K)

    policy.save_pretrained(tmp_path / "policy")
    ref.save_pretrained(tmp_path / "ref")
    ours = {name: hf.load(tmp_path / name)[0] for name in ("policy", "ref")}
    policy_logps, ref_logps = train_logps(ours["policy"]), train_logps(ours["ref"])
    torch.testing.assert_close(policy_logps, example.sequence_logps(policy, ids, mask), rtol=0, atol=1e-9)
    want = cpo.cpo_loss(policy_logps, ref_logps, beta=5.0, ranked=ranked, valid=valid)[0].mean()
    assert ours["policy"].lm_head.weight.dtype == torch.float64
    assert abs(loss.item() - want.item()) <= 1e-5 and loss.item() > 0.1


def tiny_llama():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_hidden_state_is_final_normed(arch):
    # cpo.py's usage: hidden_states[-1] @ lm_head.weight.T must be the model's own logits (transformers 5)
    torch.manual_seed(0)
    model = load_example().load()[0].eval() if arch == "gpt2" else tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 3, 9), generator=g)
    mask = torch.zeros(2, 3, 9, dtype=torch.bool)
    mask[..., 4:] = True
    with torch.no_grad():
        logits = model(ids.flatten(0, 1)[:, :-1]).logits  # (N, T-1, V)
        want = cpo.sequence_logprobs(logits, ids.flatten(0, 1)[:, 1:], mask.flatten(0, 1)[:, 1:]).view(2, 3)
        got = load_example().sequence_logps(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
