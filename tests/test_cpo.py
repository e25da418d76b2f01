"""cpo.py against plain-loop float64 references, TRL's DPO formula, autograd's gradcheck and the naive
log_softmax + gather. Tiny shapes: the whole file runs in seconds."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)


def rand_logps(B, K, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, K, generator=g, dtype=dtype) - 20,
            scale * torch.randn(B, K, generator=g, dtype=dtype) - 20)


def loop_cpo(pol, ref, beta, ranked, valid):
    """Eq. (1) / eq. (2) written out with plain Python loops over K, in float64: the per-example losses."""
    losses = []
    for b in range(pol.shape[0]):
        r = [beta * (float(pol[b, j]) - float(ref[b, j])) for j in range(pol.shape[1]) if valid[b, j]]
        if ranked:  # sum_k r_k - log sum_{j >= k} exp r_j
            losses.append(-sum(r[k] - math.log(sum(math.exp(x) for x in r[k:])) for k in range(len(r))))
        else:  # r_1 - log sum_j exp r_j
            losses.append(-(r[0] - math.log(sum(math.exp(x) for x in r))))
    return torch.tensor(losses, dtype=torch.float64)


def random_valid(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, K, generator=g) > 0.3
    valid[:, 0] = True
    valid[torch.arange(B), 1 + torch.randint(K - 1, (B,), generator=g)] = True  # >= 1 negative per row
    return valid

# ----------------------------------------------------------------------------- eq. (1), (2), DPO

@pytest.mark.parametrize("K", [2, 4, 12])
@pytest.mark.parametrize("ranked", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_cpo_matches_plain_loops(K, ranked, partial):
    pol, ref = rand_logps(8, K, seed=K)
    valid = random_valid(8, K, seed=K) if partial else torch.ones(8, K, dtype=torch.bool)
    for beta in (0.5, 5.0):
        losses, rewards = cpo.cpo_loss(pol, ref, beta=beta, ranked=ranked, valid=valid if partial else None)
        assert losses.shape == (8,) and rewards.shape == (8, K)
        torch.testing.assert_close(losses, loop_cpo(pol, ref, beta, ranked, valid), rtol=0, atol=1e-9)


def test_losses_per_example_and_rewards_detached():
    # as preference_loss: no reduction, rewards beta * (policy - ref) with no graph; float32 from bf16
    pol, ref = rand_logps(5, 4, dtype=torch.float32)
    p = pol.bfloat16().requires_grad_()
    losses, rewards = cpo.cpo_loss(p, ref.bfloat16(), beta=2.0)
    assert losses.shape == (5,) and losses.dtype == torch.float32 and losses.requires_grad
    assert rewards.dtype == torch.float32 and not rewards.requires_grad
    torch.testing.assert_close(rewards, 2.0 * (p.detach().float() - ref.bfloat16().float()))
    # each example's loss depends on its own row only
    (g,) = torch.autograd.grad(losses[2], p)
    assert (g[[0, 1, 3, 4]] == 0).all() and (g[2] != 0).all()


def test_k2_eq1_eq2_and_dpo_agree_values_and_grads():
    pol, ref = rand_logps(16, 2)
    results = []
    for fn in ("eq1", "eq2", "dpo"):
        p = pol.clone().requires_grad_()
        if fn == "dpo":
            losses, chosen, rejected = cpo.dpo_loss(p[:, 0], p[:, 1], ref[:, 0], ref[:, 1], beta=5.0)
            rewards = torch.stack([chosen, rejected], 1)
        else:
            losses, rewards = cpo.cpo_loss(p, ref, beta=5.0, ranked=fn == "eq2")
        losses.sum().backward()
        results.append((losses.detach(), rewards, p.grad))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dpo_matches_trl_sigmoid_loss():
    # TRL DPOTrainer, loss_type="sigmoid", label_smoothing=0, written out by hand:
    #   logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    #   losses = -logsigmoid(beta * logits) * (1 - ls) - logsigmoid(-beta * logits) * ls
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(10, generator=g, dtype=torch.float64) * 4 for _ in range(4)]
    beta, ls = 0.1, 0.0
    a = [t.clone().requires_grad_() for t in x]
    b = [t.clone().requires_grad_() for t in x]
    ours, chosen, rejected = cpo.dpo_loss(*a, beta=beta)
    logits = (b[0] - b[1]) - (b[2] - b[3])
    trl = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    assert ours.shape == (10,)
    ours.mean().backward(), trl.mean().backward()
    torch.testing.assert_close(ours, trl, rtol=0, atol=1e-12)
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=0, atol=1e-12)
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, beta * (x[0] - x[2]))  # TRL's chosen/rejected rewards
    torch.testing.assert_close(rejected, beta * (x[1] - x[3]))
    m = cpo.reward_metrics(torch.stack([chosen, rejected], 1))
    torch.testing.assert_close(m["reward_margin"], (chosen - rejected).mean())
    torch.testing.assert_close(m["reward_accuracy"], (chosen > rejected).double().mean().float())


@pytest.mark.parametrize("ranked", [False, True])
def test_gradcheck_cpo_loss(ranked):
    pol, ref = rand_logps(3, 5, scale=0.3)
    valid = random_valid(3, 5, seed=3)
    f = lambda p, r: cpo.cpo_loss(p, r, beta=2.0, ranked=ranked, valid=valid)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (pol.requires_grad_(), ref.requires_grad_()))


def test_reward_metrics():
    pol = torch.tensor([[0.0, -1.0, -2.0, 9.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    ref = torch.zeros_like(pol)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    _, rewards = cpo.cpo_loss(pol, ref, beta=1.0, valid=valid)
    m = cpo.reward_metrics(rewards, valid)
    assert m["reward_accuracy"].item() == 0.5  # row 0 wins (its 9.0 is not valid), row 1 loses
    assert m["reward_chosen"].item() == 0.0
    assert m["reward_rejected"].item() == pytest.approx((-1.5 + 1 / 3) / 2)
    assert m["reward_margin"].item() == pytest.approx((1.5 - 1 / 3) / 2)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    # whatever an invalid column holds (NaN, inf) is ignored; no valid: every column counts
    garbage = rewards.masked_fill(~valid, float("nan"))
    assert all(torch.equal(v, m[k]) for k, v in cpo.reward_metrics(garbage, valid).items())
    assert cpo.reward_metrics(rewards)["reward_accuracy"].item() == 0.0

# ----------------------------------------------------------------------------- invariances, stability

@pytest.mark.parametrize("ranked", [False, True])
def test_per_example_constant_leaves_loss_unchanged(ranked):
    pol, ref = rand_logps(6, 4)
    shift = 100 * torch.randn(6, 1, dtype=torch.float64)
    a, _ = cpo.cpo_loss(pol, ref, ranked=ranked)
    b, _ = cpo.cpo_loss(pol + shift, ref, ranked=ranked)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_permuting_negatives_leaves_eq1_unchanged():
    pol, ref = rand_logps(6, 12)
    valid = random_valid(6, 12)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(11)])
    a, _ = cpo.cpo_loss(pol, ref, valid=valid)
    b, _ = cpo.cpo_loss(pol[:, perm], ref[:, perm], valid=valid[:, perm])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ranked", [False, True])
def test_invalid_columns_have_no_effect_and_zero_grad(ranked):
    pol, ref = rand_logps(5, 6)
    valid = random_valid(5, 6, seed=7)
    assert not valid.all()
    garbage = pol.masked_fill(~valid, 1e6), pol.masked_fill(~valid, float("nan"))
    p0 = pol.clone().requires_grad_()
    base, _ = cpo.cpo_loss(p0, ref, ranked=ranked, valid=valid)
    base.sum().backward()
    assert (p0.grad[~valid] == 0).all() and (p0.grad[valid] != 0).any()
    for g in garbage:
        losses, _ = cpo.cpo_loss(g, ref.masked_fill(~valid, -3e5), ranked=ranked, valid=valid)
        assert torch.equal(losses, base.detach())
    # and dropping the invalid columns entirely (here: rows with the same count) gives the same loss
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 2] = False
    a, _ = cpo.cpo_loss(pol[:2], ref[:2], ranked=ranked, valid=keep)
    b, _ = cpo.cpo_loss(pol[:2, keep[0]], ref[:2, keep[0]], ranked=ranked)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ranked", [False, True])
def test_nan_in_a_valid_column_is_that_rows_nan(ranked):
    # no validation layer: values are the caller's, and a NaN shows up in the loss of its own example
    pol, ref = rand_logps(3, 4)
    pol[1, 2] = float("nan")
    losses, _ = cpo.cpo_loss(pol, ref, ranked=ranked)
    assert losses.isnan().tolist() == [False, True, False]
    assert cpo.dpo_loss(pol[:, 0] * float("nan"), pol[:, 1], ref[:, 0], ref[:, 1], 0.1)[0].isnan().all()


@pytest.mark.parametrize("ranked", [False, True])
def test_stable_for_huge_logps_and_bf16(ranked):
    g = torch.Generator().manual_seed(2)
    pol = (-1e4 * torch.rand(4, 12, generator=g)).requires_grad_()  # float32, |log p| up to 1e4
    ref = -1e4 * torch.rand(4, 12, generator=g)
    losses, rewards = cpo.cpo_loss(pol, ref, beta=5.0, ranked=ranked)
    losses.mean().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pol.grad).all() and losses.mean().item() > 1000
    assert all(torch.isfinite(v) for v in cpo.reward_metrics(rewards).values())
    pb = pol.detach().bfloat16().requires_grad_()
    lb, _ = cpo.cpo_loss(pb, ref.bfloat16(), beta=5.0, ranked=ranked)
    lf, _ = cpo.cpo_loss(pb.detach().float(), ref.bfloat16().float(), beta=5.0, ranked=ranked)
    assert lb.dtype == torch.float32 and torch.equal(lb.detach(), lf)  # the bf16 values, computed in float32
    lb.mean().backward()
    assert pb.grad.dtype == torch.bfloat16 and torch.isfinite(pb.grad.float()).all()


def test_self_check_runs():
    # `python cpo.py`: the fast paths against the definition, eq. (1) = eq. (2) = DPO at K = 2
    out = subprocess.run([sys.executable, os.path.join(ROOT, "cpo.py")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "ok" and sum("sequence_logprobs" in line for line in lines) >= 2
    assert any(line.startswith("DPO at K = 2") for line in lines)

# ----------------------------------------------------------------------------- sequence log-probs

EOS, V = 7, 23


def eos_padded_batch(seed=0):
    """input_ids (N, T) = prompt + continuation ending in EOS, right-padded with pad = EOS, and cont_mask
    by position: the last scored token of every row is the EOS, followed by more EOS-valued pads."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 5), (2, 9), (4, 1), (1, 12)]  # (prompt, continuation incl. EOS)
    T = max(p + c for p, c in lengths) + 2
    ids = torch.full((len(lengths), T), EOS)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for n, (p, c) in enumerate(lengths):
        ids[n, :p + c - 1] = torch.randint(8, V, (p + c - 1,), generator=g)  # no EOS inside
        ids[n, p + c - 1] = EOS
        mask[n, p:p + c] = True
    return ids, mask


def naive_logprobs(logits, labels, mask):
    lp = logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    return (lp * mask).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 128])
def test_logprob_paths_match_naive_including_eos_equal_to_pad(chunk_size):
    ids, cont_mask = eos_padded_batch()
    labels, mask = ids[:, 1:], cont_mask[:, 1:]
    N, T = labels.shape
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, T, 16, generator=g), torch.randn(V, 16, generator=g)
    logits = hidden @ weight.T
    want = naive_logprobs(logits, labels, mask)
    for got in (cpo.sequence_logprobs_chunked(logits, labels, mask, chunk_size=chunk_size),
                cpo.sequence_logprobs_from_hidden(hidden, weight, labels, mask, chunk_size=chunk_size)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the final EOS is scored even though it equals the pad id: masking by id would drop it
    last = torch.zeros_like(mask)
    last[torch.arange(N), mask.long().cumsum(1).argmax(1)] = True
    assert (labels[last] == EOS).all()
    assert (naive_logprobs(logits, labels, mask & ~last) - want).abs().min() > 1e-3


def test_fast_paths_compute_the_definition_values_and_grads():
    # sequence_logprobs is the 4-line definition; the chunked and hidden-state paths must give its numbers
    ids, cont_mask = eos_padded_batch(seed=9)
    labels, mask = ids[:, 1:], cont_mask[:, 1:]
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(*labels.shape, 16, generator=g, requires_grad=True)
    weight = torch.randn(V, 16, generator=g, requires_grad=True)
    w = torch.randn(len(labels), generator=g)
    want = cpo.sequence_logprobs(hidden @ weight.T, labels, mask)
    want_grads = torch.autograd.grad((want * w).sum(), (hidden, weight))
    for got in (cpo.sequence_logprobs_chunked(hidden @ weight.T, labels, mask, chunk_size=3),
                cpo.sequence_logprobs_from_hidden(hidden, weight, labels, mask, chunk_size=3)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for a, b in zip(torch.autograd.grad((got * w).sum(), (hidden, weight)), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, naive_logprobs(hidden @ weight.T, labels, mask), rtol=0, atol=1e-5)


def test_logprobs_noncontiguous_bf16_and_ignored_labels():
    ids, cont_mask = eos_padded_batch(seed=2)
    full = torch.randn(ids.shape[0], ids.shape[1], V, dtype=torch.bfloat16)
    logits, labels, mask = full[:, :-1], ids[:, 1:], cont_mask[:, 1:]  # a strided view, as a model slice
    want = naive_logprobs(logits, labels, mask)
    full.requires_grad_()
    got = cpo.sequence_logprobs_chunked(full[:, :-1], labels.masked_fill(~mask, -100), mask, chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), full)
    (want_grad,) = torch.autograd.grad(naive_logprobs(full[:, :-1], labels, mask).sum(), full)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, want_grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_logits_path_gradient_matches_naive(inplace):
    ids, cont_mask = eos_padded_batch(seed=3)
    labels, mask = ids[:, 1:], cont_mask[:, 1:]
    N, T = labels.shape
    lm_head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(N, T, 16, requires_grad=True)
    w = torch.randn(N)
    (naive_logprobs(lm_head(hidden), labels, mask) * w).sum().backward()
    want = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = lm_head.weight.grad = None
    logits = lm_head(hidden)  # a model output, as in training
    logps = cpo.sequence_logprobs_chunked(logits, labels, mask, chunk_size=3, inplace_backward=inplace)
    (logps * w).sum().backward()
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad, want[1], rtol=1e-5, atol=1e-6)


def test_gradcheck_logprob_paths():
    ids, cont_mask = eos_padded_batch(seed=4)
    labels, mask = ids[:2, 1:6], cont_mask[:2, 1:6]  # keep the Jacobian small
    N, T = labels.shape
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, T, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(N, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda h, w: cpo.sequence_logprobs_from_hidden(h, w, labels, mask, chunk_size=3)
    assert torch.autograd.gradcheck(f, (hidden, weight))
    chunked = lambda x: cpo.sequence_logprobs_chunked(x, labels, mask, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(chunked, (logits,), fast_mode=True)  # a random projection of the Jacobian


def test_mle_loss_and_the_callers_mixed_objective():
    ids, cont_mask = eos_padded_batch(seed=6)
    labels, mask = ids[:, 1:], cont_mask[:, 1:]
    logits = torch.randn(*labels.shape, V, dtype=torch.float64)
    nll = -logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(cpo.mle_loss(logits, labels, mask, chunk_size=4), nll[mask].mean())
    # rows as (B=2, K=2): the docstring's alpha * L_MLE + L_CPO, L_MLE from the ground truths' log-probs
    logps = cpo.sequence_logprobs(logits, labels, mask).view(2, 2)
    ref = logps.detach() + torch.randn(2, 2, dtype=torch.float64)
    losses, _ = cpo.cpo_loss(logps, ref)
    mixed = losses.mean() + 0.3 * -logps[:, 0].sum() / cont_mask.view(2, 2, -1)[:, 0].sum()
    gt = mask.view(2, 2, -1)[:, 0]
    mle = cpo.mle_loss(logits.view(2, 2, *logits.shape[1:])[:, 0], labels.view(2, 2, -1)[:, 0], gt)
    torch.testing.assert_close(mixed, losses.mean() + 0.3 * mle)


def test_hidden_path_under_autocast_matches_logits_path():
    # train.py runs the model under bf16 autocast: the backward (outside autocast) must redo the
    # forward's bf16 matmul, not mix bf16 hidden states with the float32 weight
    ids, cont_mask = eos_padded_batch(seed=8)
    labels, mask = ids[:, 1:], cont_mask[:, 1:]
    lm_head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(*labels.shape, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpo.sequence_logprobs_from_hidden(hidden, lm_head.weight, labels, mask, chunk_size=3)
        want = cpo.sequence_logprobs(lm_head(hidden), labels, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    gh, gw = torch.autograd.grad(got.sum(), (hidden, lm_head.weight))
    wh, ww = torch.autograd.grad(want.sum(), (hidden, lm_head.weight))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww, rtol=0.02, atol=0.02)  # autograd's dW sums in bf16, ours in float32

# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises():
    pol, ref = rand_logps(3, 4)
    bad = [
        (lambda: cpo.dpo_loss(pol[:, 0], pol[:2, 1], ref[:, 0], ref[:, 1], 0.1), "four \\(B,\\)"),
        (lambda: cpo.sequence_logprobs_chunked(torch.randn(2, 5, V), torch.zeros(2, 4, dtype=torch.long),
                                               torch.ones(2, 4, dtype=torch.bool)), "logits must be"),
        (lambda: cpo.sequence_logprobs_chunked(torch.randn(2, 5, V), torch.zeros(2, 5, dtype=torch.long),
                                               torch.ones(2, 5)), "mask bool"),
        (lambda: cpo.sequence_logprobs_chunked(torch.randn(2, 5, V), torch.full((2, 5), V),
                                               torch.ones(2, 5, dtype=torch.bool)), "must lie in"),
        (lambda: cpo.sequence_logprobs_from_hidden(torch.randn(2, 5, 4), torch.randn(V, 3),
                                                   torch.zeros(2, 5, dtype=torch.long),
                                                   torch.ones(2, 5, dtype=torch.bool)), "disagree"),
        (lambda: cpo.mle_loss(torch.randn(2, 5, V), torch.zeros(2, 5, dtype=torch.long),
                              torch.zeros(2, 5, dtype=torch.bool)), "no tokens"),
    ]
    for fn, message in bad:
        with pytest.raises(ValueError, match=message):
            fn()
    # cpo_loss: one cheap shape assert (no device sync), as preference_loss has no validation layer
    for args in [(pol, ref[:, :3]), (pol[:, :1], ref[:, :1]), (pol, ref, 5.0, False, torch.ones(3, 3) > 0)]:
        with pytest.raises(AssertionError, match="all \\(B, K\\)"):
            cpo.cpo_loss(*args)
    with pytest.raises(ValueError):  # not (B, K)
        cpo.cpo_loss(pol[:, 0], ref[:, 0])
