"""The shared-prompt forward (each prompt run once for its K continuations) against the naive path, where
every prompt + continuation runs whole: the same log-probs, the same CPO gradients, the same reference cache,
and DDP. Tiny random models with fixed seeds; ragged prompts and ragged continuations."""

import pytest
import torch

import data
import scoring
import train
from model import ModelConfig, Transformer
from test_train import CPO, TINY, assert_weights_close, run, weights

V = 101


def stand_in(family):
    """A tiny GPT-2 (learned positions) or LLaMA (RoPE, grouped-query attention) with random weights."""
    torch.manual_seed(0)
    llama = family == "llama"
    cfg = ModelConfig(model_type=family, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2 if llama else 4,
                      n_embd=32, n_inner=64, max_seq_len=64, rope_theta=5000.0, tie_word_embeddings=not llama)
    return Transformer(cfg)


def ragged_batch(B=3, K=4, seed=0):
    """(B, K, T) ids and continuation masks as negatives.build_cpo_batch lays them out: prompts of 1..9 tokens
    (one per example, shared by its K rows), continuations of 1..12 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda lo, hi, n: torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(V, (n,), generator=g).tolist() for n in [1, 9, *lengths(1, 9, B - 2)]]
    conts = [torch.randint(V, (n,), generator=g).tolist() for n in [1, 12, *lengths(1, 12, B * K - 2)]]
    ids, mask = data.pad_right([p for p in prompts for _ in range(K)], conts, pad_id=0)  # (B K, T)
    return ids.view(B, K, -1), mask.view(B, K, -1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_prompt_logps_equal_the_naive_path(family):
    model = stand_in(family)
    ids, mask = ragged_batch()
    B, K, T = ids.shape
    shared = scoring.shared_prompt_logps(model, ids, mask)  # (B, K)
    naive = train.sequence_logps(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(B, K)
    assert (shared - naive).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_prompt_gradients_equal_the_naive_path(family):
    """Gradients reach the prompt's computation from all K continuations, summed, as in the naive path."""
    model = stand_in(family)
    ids, mask = ragged_batch(seed=1)
    B, K, T = ids.shape
    weight = torch.randn(B, K, generator=torch.Generator().manual_seed(2))  # any loss of the (B, K) log-probs
    grads = []
    for logps in (lambda: scoring.shared_prompt_logps(model, ids, mask),
                  lambda: train.sequence_logps(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(B, K)):
        grads.append(torch.autograd.grad((weight * logps()).sum(), list(model.parameters())))
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert (a - b).norm() <= 1e-4 * b.norm(), name


def test_split_prompts_left_pads_prompts_and_right_pads_continuations():
    ids, mask = ragged_batch(B=2, K=2, seed=3)
    prompt, prompt_mask, cont, cont_mask, n_prompt = scoring.split_prompts(ids, mask)
    for b in range(2):
        P = int(n_prompt[b])
        assert prompt_mask[b].tolist() == [0] * (prompt.shape[1] - P) + [1] * P
        assert prompt[b, -P:].tolist() == ids[b, 0, :P].tolist()
        for k in range(2):
            assert cont[b, k][cont_mask[b, k]].tolist() == ids[b, k][mask[b, k]].tolist()
    with pytest.raises(ValueError, match="share one prompt"):
        scoring.split_prompts(ids.flip(0).view(1, 4, -1), mask.flip(0).view(1, 4, -1))


def cpo_grads(cfg, policy, ref, tok, examples, shared):
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id, shared_prompt=shared)
    policy.zero_grad()
    loss_sum, _ = train.cpo_objective(cfg, policy, ref, examples, rt)
    (loss_sum / len(examples)).backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters()}, rt.ref_cache.entries


@pytest.mark.parametrize("ranked", [False, True])  # eq. (1), eq. (2)
def test_cpo_step_gradients_equal_the_naive_step(ranked, tiny_config, perturb):
    # fixed negatives: BN and TN come back, so the reference cache holds more than the ground truths
    cfg = tiny_config(objective="cpo", negatives="bn:2,mn:2,tn:2", ranked=ranked, beta=5.0,
                      fixed_negatives=True)
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    perturb(policy)  # the policy differs from the reference, so the rewards are not all 0
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=6, seed=0)
    assert len({len(e.prompt_ids) for e in examples}) > 1  # ragged prompts
    shared, shared_cache = cpo_grads(cfg, policy, ref, tok, examples, shared=True)
    naive, naive_cache = cpo_grads(cfg, policy, ref, tok, examples, shared=False)
    for n in naive:
        assert (shared[n] - naive[n]).norm() <= 1e-4 * naive[n].norm(), n
    # the reference cache: the same sequence hashes, the same log-probs, whichever path filled it
    assert shared_cache.keys() == naive_cache.keys() and len(naive_cache) > len(examples)
    assert max(abs(shared_cache[k] - naive_cache[k]) for k in naive_cache) <= 1e-4


def test_reference_cache_scores_only_the_groups_it_cannot_answer():
    model = stand_in("gpt2")
    ids, mask = ragged_batch(seed=4)
    B, K, T = ids.shape
    keys = scoring.sequence_keys(ids.flatten(0, 1), mask.flatten(0, 1))
    cache = scoring.ReferenceCache({k: float(i) for i, k in enumerate(keys)})  # stand-ins: never rescored
    del cache.entries[keys[5]]  # example 1 has one uncached sequence: its group is scored, the rest read back
    cacheable = torch.ones(B, K, dtype=torch.bool)
    cacheable[2, 0] = False  # not cacheable: example 2's group is scored, and nothing of it stored
    rt = train.Runtime(device=torch.device("cpu"), ref_cache=cache)
    out = train.reference_logps(model, ids, mask, cacheable, rt)
    naive = train.sequence_logps(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(B, K)
    assert out.shape == (B, K)
    assert (out[1:3] - naive[1:3]).abs().max() <= 1e-4  # the two scored groups
    others = [b for b in range(B) if b not in (1, 2)]
    assert out[others].flatten().tolist() == [float(b * K + k) for b in others for k in range(K)]
    assert abs(cache.entries[keys[5]] - naive[1, 1].item()) <= 1e-4  # stored now
    assert cache.entries[keys[2 * K]] == float(2 * K)  # the uncacheable one: its old value left alone


def test_bf16_autocast_shared_prompt_close_to_naive():
    model = stand_in("llama")
    ids, mask = ragged_batch(seed=5)
    B, K, T = ids.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = scoring.shared_prompt_logps(model, ids, mask)
        naive = train.sequence_logps(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(B, K)
    exact = scoring.shared_prompt_logps(model, ids, mask)
    assert shared.dtype == torch.float32 and torch.isfinite(shared).all()
    # bf16 has 8 bits of mantissa: both paths land as near the float32 numbers as each other
    assert (shared - exact).abs().max() <= 2 * (naive - exact).abs().max() + 0.05


def test_two_ranks_match_one_process_on_the_shared_path(tmp_path):
    """torchrun with 2 CPU ranks (gloo), shared-prompt CPO, reaches the weights of 1 process."""
    args = [*TINY, *CPO, "--shared_prompt=true", "--steps=3", "--ckpt_interval=0"]
    run([*args, f"--out_dir={tmp_path / 'one'}"])
    run([*args, f"--out_dir={tmp_path / 'two'}"], nproc=2)
    assert_weights_close(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"), atol=1e-5)
