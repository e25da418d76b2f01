"""
Sequence-level Contrastive Preference Optimization (CPO): Feng, Ram, Hawkins, Rawal, Zhao, Zha (2024),
"Sequence-level Large Language Model Training with Contrastive Preference Optimization".
(Not the CPO of Xu et al. 2024 that TRL ships.) This file imports only torch: copy it anywhere.

For a prompt x with ground truth y_1 and synthetic negatives y_2..y_K, the implicit reward is

    r(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x)),   log pi(y|x) = SUM of the continuation's token logps

Eq. (1), CPO:                 L = -mean_batch[ r(y_1) - log sum_{j=1..K} exp r(y_j) ]
Eq. (2), CPO with ranking:    L = -mean_batch[ sum_{k=1..K} ( r(y_k) - log sum_{j=k..K} exp r(y_j) ) ]
                              (Plackett-Luce, the columns already in ranking order, best first, y_1 first)

With K = 2 both are DPO's -log sigmoid(r(y_1) - r(y_2)). cpo_loss returns per-example losses and the
rewards, as DPO's reference preference_loss does: the mean over the batch, and the paper's mixed objective
alpha * L_MLE + L_CPO (L_MLE the ground truths' mean token NLL), are the caller's.

Usage with a transformers model (examples/cpo_transformers.py runs this), B prompts x K continuations
flattened to N = B*K rows:

    import cpo
    # ids (N, T): prompt + continuation, right-padded; cont_mask (N, T) bool: True on the continuation
    # tokens, final EOS included; valid (B, K) bool: which negatives exist
    def logps(model, ids, cont_mask):  # (N,) log pi(y|x); the (N, T, V) logits are never made
        out = model(ids[:, :-1], output_hidden_states=True, logits_to_keep=1)  # 1 position's logits
        hidden = out.hidden_states[-1]  # (N, T-1, C), after the final norm (GPT-2, LLaMA)
        return cpo.sequence_logprobs_from_hidden(hidden, model.lm_head.weight, ids[:, 1:], cont_mask[:, 1:])

    policy_logps = logps(policy, ids, cont_mask).view(B, K)
    with torch.no_grad():
        ref_logps = logps(ref, ids, cont_mask).view(B, K)
    losses, rewards = cpo.cpo_loss(policy_logps, ref_logps, beta=5.0, ranked=True, valid=valid)  # (B,) (B, K)
    mle = -policy_logps[:, 0].sum() / cont_mask.view(B, K, -1)[:, 0].sum()  # L_MLE, if alpha > 0
    (losses.mean() + alpha * mle).backward()
    print(cpo.reward_metrics(rewards, valid))

A model whose logits are more than hidden @ lm_head.weight.T (a bias, a soft-cap) takes the logits path:
sequence_logprobs_chunked(model(ids[:, :-1]).logits, ids[:, 1:], cont_mask[:, 1:]).

The file reads in this order: the losses (cpo_loss, reward_metrics, dpo_loss, mle_loss); sequence_logprobs,
the 4-line definition of log pi(y|x); the two cheap negative samplers, truncation (TN) and batch (BN); then
two fast paths that compute sequence_logprobs' numbers with far less memory: sequence_logprobs_chunked (a
chunked softmax over the logits) and sequence_logprobs_from_hidden (straight from the final hidden states and
lm_head.weight: the (N, T, V) logits never exist). `python cpo.py` checks both against the definition.
"""
import torch
import torch.nn.functional as F


def _acc(dtype):
    """The dtype we compute in: float32, or float64 for float64 inputs (bf16/fp16 are upcast)."""
    return torch.promote_types(dtype, torch.float32)

# ----------------------------------------------------------------------------- losses

def cpo_loss(policy_logps, ref_logps, beta=5.0, ranked=False, valid=None):
    """
    CPO: eq. (1), or with ranked=True the Plackett-Luce eq. (2). Returns (losses (B,), rewards (B, K)).
    policy_logps, ref_logps (B, K): log pi(y|x) of each sequence, column 0 the ground truth y_1, then the
    negatives (for eq. (2) in ranking order, best first). valid (B, K) bool, default all True: False columns
    are left out of every sum and get zero gradient; the caller guarantees valid[:, 0] and a valid negative
    in every row. A NaN in a valid column makes that row's loss NaN. Math in float32 (float64 stays float64).
    rewards = beta * (policy_logps - ref_logps), detached; reward_metrics summarises them.
    """
    B, K = policy_logps.shape
    valid = torch.ones(B, K, dtype=torch.bool, device=policy_logps.device) if valid is None else valid
    assert K >= 2 and ref_logps.shape == valid.shape == (B, K), "policy_logps, ref_logps, valid: all (B, K)"
    policy_logps, ref_logps = policy_logps.to(_acc(policy_logps.dtype)), ref_logps.to(_acc(ref_logps.dtype))
    rewards = beta * (policy_logps - ref_logps)  # (B, K): r(y) = beta * log pi_theta(y|x) / pi_ref(y|x)
    r = rewards.masked_fill(~valid, 0)  # invalid columns: a finite stand-in, left out of every sum below
    if ranked:  # eq. (2): sum_k [ r(y_k) - log sum_{j >= k} exp r(y_j) ], over valid k and j
        later_or_same = torch.ones(K, K, dtype=torch.bool, device=r.device).triu()  # [k, j]: j >= k
        diagonal = torch.eye(K, dtype=torch.bool, device=r.device)  # j = k: no row k's sum is ever empty
        in_tail = (later_or_same & valid[:, None, :]) | diagonal  # (B, K, K): j in row k's sum
        tail_lse = r[:, None, :].masked_fill(~in_tail, float("-inf")).logsumexp(-1)  # (B, K)
        losses = -torch.where(valid, r - tail_lse, 0).sum(-1)
    else:  # eq. (1): r(y_1) - log sum_j exp r(y_j), a log-softmax taken at the ground truth
        losses = -(r[:, 0] - r.masked_fill(~valid, float("-inf")).logsumexp(-1))
    return losses, rewards.detach()


def reward_metrics(rewards, valid=None):
    """
    rewards (B, K), column 0 the ground truth (cpo_loss's), valid (B, K) bool -> batch means, detached 0-dim
    tensors: reward_accuracy (r(y_1) beats every valid negative), reward_margin (r(y_1) minus the mean valid
    negative), reward_chosen (r(y_1)), reward_rejected (the mean valid negative). Invalid columns are ignored.
    """
    r = rewards.detach()
    neg = torch.ones_like(r[:, 1:], dtype=torch.bool) if valid is None else valid[:, 1:]  # (B, K-1)
    rejected = torch.where(neg, r[:, 1:], 0).sum(-1) / neg.sum(-1)  # (B,) the mean valid negative
    best_neg = r[:, 1:].masked_fill(~neg, float("-inf")).amax(-1)  # (B,)
    return dict(reward_accuracy=(r[:, 0] > best_neg).float().mean(),
                reward_margin=(r[:, 0] - rejected).mean(),
                reward_chosen=r[:, 0].mean(), reward_rejected=rejected.mean())


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """
    DPO (Rafailov et al. 2023), as the authors' preference_loss: the four (B,) sequence log-probs ->
    (losses, chosen_rewards, rejected_rewards), each (B,), the rewards detached. Float32 math. The same values
    and gradients as TRL's default sigmoid loss, and CPO's eq. (1) = eq. (2) at K = 2.
    """
    pc, pr, rc, rr = (t.to(_acc(t.dtype)) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if pc.dim() != 1 or not pc.shape == pr.shape == rc.shape == rr.shape:
        shapes = [tuple(t.shape) for t in (pc, pr, rc, rr)]
        raise ValueError(f"dpo_loss needs four (B,) tensors; got {shapes}")
    logits = (pc - rc) - (pr - rr)  # (r(y_w) - r(y_l)) / beta: the implicit rewards' difference
    losses = -F.logsigmoid(beta * logits)  # eq. (7) of the DPO paper
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def mle_loss(logits, labels, mask, chunk_size=128):
    """L_MLE: the mean token NLL over the masked positions, -sum_t log p(labels) / #masked. Scalar float32."""
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        raise ValueError("mle_loss: mask selects no tokens")
    return -sequence_logprobs_chunked(logits, labels, mask, chunk_size).sum() / n_tokens

# ------------------------------------------------------------------------ sequence log-probs: the definition

def sequence_logprobs(logits, labels, mask):
    """log pi(y|x) of eqs. (1), (2): the SUM of log p(labels[n, t]) over the positions where mask[n, t].
    logits (N, T, V), logits[:, t] predicting labels[:, t] (callers shift); labels (N, T); mask (N, T) bool,
    by position (an EOS equal to the pad id is still scored). Returns (N,) float32. Builds a float32
    (N, T, V) log-softmax: the fast paths below compute the same numbers without it."""
    logps = logits.log_softmax(-1, dtype=_acc(logits.dtype))  # (N, T, V)
    token_logps = logps.gather(-1, labels.masked_fill(~mask, 0)[..., None]).squeeze(-1)  # (N, T)
    return torch.where(mask, token_logps, 0).sum(-1)  # (N,); where, not *: an unscored -inf must not give NaN

# ----------------------------------------------------------------------------- negatives: TN and BN
# The two samplers that need no model, as pure functions of token-id lists. (negatives.py adds the two
# that sample from a model, AN and MN, and assembles a batch of all four.)

def truncation_negatives(continuation, n, eos_id, generator=None):
    """TN: n continuations, each the ground truth cut after k tokens plus EOS. With the ground truth
    c = [t_1 .. t_L, EOS], its "original length" is L (tokens before its EOS) and k is uniform on
    {1 .. L-1}: at least one token kept, strictly shorter than the original.
    One-token continuations: [t_1, EOS] (L=1) has no such cut, so it gets [EOS] (stop at once, the
    only strictly shorter continuation; still one scored token). [EOS] alone (L=0) has no shorter
    continuation at all: returns [] (the caller marks those columns invalid)."""
    L = len(continuation) - 1
    assert L >= 0 and continuation[-1] == eos_id, "a continuation must end with its EOS"
    if L == 0:
        return []
    if L == 1:
        return [[eos_id] for _ in range(n)]
    cuts = torch.randint(1, L, (n,), generator=generator).tolist()  # k in {1 .. L-1}
    return [list(continuation[:k]) + [eos_id] for k in cuts]


def batch_negatives(continuations, n, generator=None, allow_fewer=False, pool=None):
    """BN: for each row, n other ground-truth continuations, drawn without replacement from `pool`
    (default: the rows themselves). Never the row's own continuation, nor any with identical tokens;
    candidates with identical tokens count once, in the pool's order. A row with fewer than n candidates
    raises ValueError, unless allow_fewer=True: then it gets every candidate it has (the caller marks the
    rest invalid). generator: one torch.Generator, or a list of one per row.
    The paper (§3): the negatives of x_i are {y_j}_{j != i} of the batch. In training (train.py) the pool is
    the step's whole GLOBAL batch, which every rank computes, so an example's BN negatives are the same for
    any micro-batch size and world size, and no rank talks to another to get them."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * len(continuations)
    assert len(gens) == len(continuations), f"{len(gens)} generators for {len(continuations)} rows"
    pool = continuations if pool is None else pool
    distinct = list(dict.fromkeys(tuple(c) for c in pool))
    out = []
    for i, own in enumerate(continuations):
        candidates = [c for c in distinct if c != tuple(own)]
        if len(candidates) < n and not allow_fewer:
            raise ValueError(f"batch_negatives: row {i} has only {len(candidates)} distinct other "
                             f"continuations in a batch of {len(pool)}, asked for {n}; use a "
                             f"bigger batch, fewer bn negatives, or allow_fewer=True")
        pick = torch.randperm(len(candidates), generator=gens[i])[:n].tolist()
        out.append([list(candidates[j]) for j in pick])
    return out

# ----------------------------------------------------------------------------- the fast paths, same numbers

CHUNK_FLOATS = 2**21  # sequence_logprobs_from_hidden's default chunk: (2**21 // V, V) float32 logits, 8 MB


def _check_labels(labels, mask, n_vocab):
    """Shapes, and every scored label in [0, V). Returns labels with the unscored ones set to 0
    (so -100 style padding is harmless). Costs one GPU->CPU sync; a device-side assert is far worse."""
    if labels.dim() != 2 or labels.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"labels and mask must be (N, T) with mask bool; got {tuple(labels.shape)} "
                         f"and {tuple(mask.shape)} {mask.dtype}")
    if (((labels < 0) | (labels >= n_vocab)) & mask).any():
        raise ValueError(f"labels at masked positions must lie in [0, {n_vocab})")
    return labels.masked_fill(~mask, 0)


def _chunk_logprobs(z, tgt):
    """z (c, V) logits, tgt (c,) -> log softmax(z)[tgt] (c,), computed in float32 (or 64)."""
    return torch.log_softmax(z, -1, dtype=_acc(z.dtype)).gather(1, tgt[:, None]).squeeze(1)


def _chunk_grad(z, tgt, g, out=None):
    """g * d log softmax(z)[tgt] / dz = g * (onehot(tgt) - softmax(z)), written into out (c, V) if given."""
    p = torch.softmax(z, -1, dtype=_acc(z.dtype))  # (c, V), the one float32 temporary
    p.scatter_add_(1, tgt[:, None], -torch.ones_like(p[:, :1]))  # softmax - onehot
    return torch.mul(p, -g[:, None], out=p if out is None else out)  # out may be z: softmax read it all


class _LogprobsFromLogits(torch.autograd.Function):
    # chunk_size consecutive positions of one sequence at a time (a view, any strides): a float32
    # (c, V) log-softmax forward; the backward recomputes a float32 (c, V) softmax. Nothing of size
    # (N, T, V) is kept but the logits themselves. Every position is computed (cheap next to the
    # model); unscored ones are zeroed by mask.
    @staticmethod
    def forward(ctx, logits, labels, mask, chunk_size, inplace_backward):
        labels = _check_labels(labels, mask, logits.shape[-1])
        (N, T, _), c = logits.shape, chunk_size
        tok = logits.new_empty(N, T, dtype=_acc(logits.dtype))  # (N, T) token log-probs
        for n in range(N):
            for t in range(0, T, c):
                tok[n, t:t + c] = _chunk_logprobs(logits[n, t:t + c], labels[n, t:t + c])
        ctx.save_for_backward(logits, labels, mask)
        ctx.chunk_size, ctx.inplace_backward = chunk_size, inplace_backward
        return torch.where(mask, tok, 0).sum(-1)  # where, not *: an unscored -inf must not give NaN

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        logits, labels, mask = ctx.saved_tensors
        (N, T, _), c = logits.shape, ctx.chunk_size
        w = torch.where(mask, grad_out[:, None], 0)  # (N, T): unscored positions get zero gradient
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)  # every position is written
        for n in range(N):
            for t in range(0, T, c):
                _chunk_grad(logits[n, t:t + c], labels[n, t:t + c], w[n, t:t + c], out=grad[n, t:t + c])
        return grad, None, None, None, None


def sequence_logprobs_chunked(logits, labels, mask, chunk_size=128, inplace_backward=False):
    """
    sequence_logprobs(logits, labels, mask), the same numbers, chunk_size positions at a time: no float32
    (N, T, V) tensor ever exists, and the backward recomputes each chunk's softmax. Labels at unscored
    positions may be anything (-100 style padding is fine); scored ones must lie in [0, V) (checked: one
    GPU->CPU sync, far better than a device-side assert). Returns (N,) float32 (float64 for float64 logits).
    The gradient wrt logits is one (N, T, V) tensor in logits' dtype; inplace_backward=True writes it into
    the logits' own storage instead (they are garbage after backward; autograd raises if another graph
    node saved them).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be (N, T, V) matching labels (N, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return _LogprobsFromLogits.apply(logits, labels, mask, chunk_size, inplace_backward)


def _matmul_dtype(hidden, weight):
    """The dtype of h @ W^T: autocast's when it is on (as the model's own lm_head would run), else the
    inputs' common dtype. Chosen once in the forward and reused by the backward, which autocast skips."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LogprobsFromHidden(torch.autograd.Function):
    # Only the scored positions are gathered; each chunk's logits z = h @ W^T are made in the
    # lm_head's dtype, used in float32 and dropped; the backward remakes them.
    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk_size):
        labels = _check_labels(labels, mask, weight.shape[0])
        rows, cols = mask.nonzero(as_tuple=True)  # (M,) each: one GPU->CPU sync for M
        ctx.dtype = _matmul_dtype(hidden, weight)
        w = weight.to(ctx.dtype)  # (V, C): a copy only under autocast or mixed dtypes
        tgt, out = labels[rows, cols], hidden.new_zeros(len(hidden), dtype=_acc(ctx.dtype))
        for i in range(0, len(tgt), chunk_size):
            s = slice(i, i + chunk_size)
            z = hidden[rows[s], cols[s]].to(ctx.dtype) @ w.T  # (c, V)
            out.index_add_(0, rows[s], _chunk_logprobs(z, tgt[s]))
        ctx.save_for_backward(hidden, weight, rows, cols, tgt)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, rows, cols, tgt = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None  # (N, T, C)
        grad_w = weight.new_zeros(weight.shape, dtype=_acc(weight.dtype)) if ctx.needs_input_grad[1] else None
        for i in range(0, len(tgt), ctx.chunk_size):
            s = slice(i, i + ctx.chunk_size)
            h = hidden[rows[s], cols[s]].to(ctx.dtype)  # (c, C)
            dz = _chunk_grad(h @ w.T, tgt[s], grad_out[rows[s]])  # (c, V) float32
            if grad_h is not None:
                grad_h[rows[s], cols[s]] = (dz.to(ctx.dtype) @ w).to(hidden.dtype)
            if grad_w is not None:  # (V, C), accumulated in float32 across chunks
                grad_w.addmm_(dz.T, h.to(dz.dtype))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def sequence_logprobs_from_hidden(hidden, weight, labels, mask, chunk_size=None):
    """
    sequence_logprobs(hidden @ weight.T, labels, mask) without ever materialising the (N, T, V)
    logits: only the masked positions are gathered, and their logits made chunk_size tokens at a time
    (in autocast's dtype when it is on, as the lm_head would run; the softmax always in float32).
    chunk_size None: CHUNK_FLOATS // V tokens, an 8 MB float32 chunk (41 tokens for GPT-2's vocabulary; a
    small vocabulary gets few, large chunks, since per-chunk overhead, not memory, is then what costs).
    hidden (N, T, C) final-normed hidden states; weight (V, C) the output matrix (lm_head.weight).
    Returns (N,) float32, differentiable wrt hidden and weight: the chunked backward remakes each
    chunk's logits and accumulates dW in float32, so the extra memory is dW plus (chunk_size, V) temporaries.
    """
    if (hidden.dim() != 3 or hidden.shape[:2] != labels.shape or weight.dim() != 2
            or weight.shape[1] != hidden.shape[2]):
        raise ValueError(f"hidden (N, T, C), weight (V, C) and labels (N, T) disagree: "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    chunk_size = chunk_size or max(1, CHUNK_FLOATS // weight.shape[0])
    return _LogprobsFromHidden.apply(hidden, weight, labels, mask, chunk_size)

# ----------------------------------------------------------------------------- self-check: python cpo.py

def _values_and_grads(logps, inputs, direction):
    return (logps.detach(), *torch.autograd.grad((logps * direction).sum(), inputs))


def _self_check(device):
    """The fast paths against the definition, and eq. (1) = eq. (2) = DPO at K = 2, on small random inputs."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    N, T, C, V = 6, 11, 16, 50
    hidden, weight = rand(N, T, C).requires_grad_(), rand(V, C).requires_grad_()
    labels = torch.randint(0, V, (N, T), generator=g).to(device)
    mask = (torch.rand(N, T, generator=g) < 0.7).to(device)
    direction = rand(N)  # the gradients of a random projection
    want = _values_and_grads(sequence_logprobs(hidden @ weight.T, labels, mask), (hidden, weight), direction)
    fast = {"sequence_logprobs_chunked": sequence_logprobs_chunked(hidden @ weight.T, labels, mask, 4),
            "sequence_logprobs_from_hidden": sequence_logprobs_from_hidden(hidden, weight, labels, mask, 4)}
    for name, logps in fast.items():
        for got, expected in zip(_values_and_grads(logps, (hidden, weight), direction), want):
            torch.testing.assert_close(got, expected)
        print(f"{name}: the values and gradients of sequence_logprobs ({N} sequences, V={V}, {device})")

    policy, ref = rand(8, 2).requires_grad_(), rand(8, 2)
    losses = {"eq. (1)": cpo_loss(policy, ref)[0], "eq. (2)": cpo_loss(policy, ref, ranked=True)[0],
              "DPO": dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=5.0)[0]}
    want = _values_and_grads(losses.pop("eq. (1)"), (policy,), 1.0)
    for name, loss in losses.items():
        for got, expected in zip(_values_and_grads(loss, (policy,), 1.0), want):
            torch.testing.assert_close(got, expected)
        print(f"{name} at K = 2: the per-example losses and gradients of eq. (1)")
    print("ok")


if __name__ == "__main__":
    _self_check("cuda" if torch.cuda.is_available() else "cpu")
