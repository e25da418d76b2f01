"""
Sequence-level Contrastive Preference Optimization (CPO): Feng, Ram, Hawkins, Rawal, Zhao, Zha (2024),
"Sequence-level Large Language Model Training with Contrastive Preference Optimization".
(Not the CPO of Xu et al. 2024 that TRL ships.) This file imports only torch: copy it anywhere.

For a prompt x with ground truth y_1 and synthetic negatives y_2..y_K, the implicit reward is

    r(y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))      log pi(y|x) = SUM of the continuation's token log-probs

Eq. (1), CPO:                 L = -mean_batch[ r(y_1) - log sum_{j=1..K} exp r(y_j) ]
Eq. (2), CPO with ranking:    L = -mean_batch[ sum_{k=1..K} ( r(y_k) - log sum_{j=k..K} exp r(y_j) ) ]
                              (Plackett-Luce, the columns already in ranking order, best first, y_1 first)

With K = 2 both are DPO's -log sigmoid(r(y_1) - r(y_2)). The paper's mixed objective alpha * L_MLE + L_CPO
is cpo_loss(..., mle_weight=alpha, gt_tokens=...), L_MLE being the ground truths' mean token NLL.

Usage in any training loop (batch of B prompts x K continuations, flattened to N = B*K rows):

    import cpo
    # input_ids (N, T): prompt + continuation, right-padded; cont_mask (N, T) bool: True on the
    # continuation tokens, final EOS included; valid (B, K) bool: which negatives exist
    labels, mask = input_ids[:, 1:], cont_mask[:, 1:]       # logits[:, t] predicts labels[:, t]
    logps = cpo.sequence_logprobs(policy(input_ids[:, :-1]), labels, mask).view(B, K)
    with torch.no_grad():
        ref_logps = cpo.sequence_logprobs(ref(input_ids[:, :-1]), labels, mask).view(B, K)
    loss, metrics = cpo.cpo_loss(logps, ref_logps, beta=5.0, ranked=True, valid=valid)
    loss.backward()

The file reads in that order: the losses (cpo_loss, dpo_loss, mle_loss), then sequence_logprobs, the
4-line definition of log pi(y|x), then two fast paths that compute the same numbers with far less memory:
sequence_logprobs_chunked (a chunked softmax over the logits) and sequence_logprobs_from_hidden (straight
from the final hidden states and lm_head.weight: the (N, T, V) logits never exist; train.py uses it).
"""
import torch
import torch.nn.functional as F


def _acc(dtype):
    """The dtype we compute in: float32, or float64 for float64 inputs (bf16/fp16 are upcast)."""
    return torch.promote_types(dtype, torch.float32)

# ----------------------------------------------------------------------------- losses

def cpo_loss(policy_logps, ref_logps, beta=5.0, ranked=False, valid=None, mle_weight=0.0, gt_tokens=None):
    """
    CPO loss: eq. (1), or with ranked=True the Plackett-Luce eq. (2).
    policy_logps, ref_logps (B, K): log pi(y|x) of each sequence, column 0 the ground truth y_1, then the
    negatives (for eq. (2) in ranking order, best first). valid (B, K) bool, default all True: False columns
    are left out of every sum and get zero gradient. The caller guarantees valid[:, 0] and at least one
    valid negative per row; NaN in a valid column gives a NaN loss (train.py stops on it).
    mle_weight = alpha > 0: alpha * L_MLE + L_CPO, L_MLE = -sum_b policy_logps[b, 0] / sum_b gt_tokens[b],
    the ground truths' mean token NLL (= mle_loss); gt_tokens (B,) their token counts.
    Math in float32 (float64 stays float64). Returns (loss, metrics): detached 0-dim tensors reward_accuracy
    (r(y_1) beats every valid negative), reward_margin (r(y_1) - mean valid negative), reward_chosen,
    reward_rejected (batch means), and cpo_loss, mle_loss when mle_weight > 0.
    """
    if policy_logps.dim() != 2 or policy_logps.shape != ref_logps.shape or policy_logps.shape[1] < 2:
        raise ValueError(f"policy_logps and ref_logps must both be (B, K) with K >= 2; got "
                         f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    B, K = policy_logps.shape
    valid = torch.ones_like(policy_logps, dtype=torch.bool) if valid is None else valid
    assert valid.shape == (B, K) and valid.dtype == torch.bool, "valid must be a (B, K) bool tensor"
    assert not mle_weight or gt_tokens is not None and gt_tokens.shape == (B,), "mle_weight > 0 needs gt_tokens (B,)"
    policy_logps, ref_logps = policy_logps.to(_acc(policy_logps.dtype)), ref_logps.to(_acc(ref_logps.dtype))
    r = beta * (policy_logps - ref_logps)  # (B, K) rewards r(y) = beta * log pi_theta(y|x) / pi_ref(y|x)
    r = r.masked_fill(~valid, 0)  # invalid columns: a finite stand-in, masked out below
    if ranked:  # eq. (2): sum_k [ r_k - log sum_{j >= k, valid} exp r_j ], row k never empty (j = k)
        later = torch.ones(K, K, dtype=torch.bool, device=r.device).triu()  # later[k, j]: j >= k
        keep = later & valid[:, None, :] | torch.eye(K, dtype=torch.bool, device=r.device)  # (B, K, K)
        lse = r[:, None, :].masked_fill(~keep, float("-inf")).logsumexp(-1)  # (B, K)
        loss = -torch.where(valid, r - lse, 0).sum(-1).mean()
    else:  # eq. (1): r_1 - log sum_{j valid} exp r_j, a log-softmax taken at the ground truth
        loss = -(r[:, 0] - r.masked_fill(~valid, float("-inf")).logsumexp(-1)).mean()
    metrics = _reward_metrics(r.detach(), valid)
    if mle_weight:  # the paper's mixed objective alpha * L_MLE + L_CPO
        mle = -policy_logps[:, 0].sum() / gt_tokens.sum()
        metrics.update(cpo_loss=loss.detach(), mle_loss=mle.detach())
        loss = loss + mle_weight * mle
    return loss, metrics


def _reward_metrics(r, valid):
    """r (B, K) rewards (column 0 the ground truth), valid (B, K) -> dict of detached 0-dim tensors."""
    neg = valid[:, 1:]
    rejected = (r[:, 1:] * neg).sum(-1) / neg.sum(-1)  # (B,) mean valid negative
    best_neg = r[:, 1:].masked_fill(~neg, float("-inf")).amax(-1)  # (B,)
    return dict(reward_accuracy=(r[:, 0] > best_neg).float().mean(), reward_margin=(r[:, 0] - rejected).mean(),
                reward_chosen=r[:, 0].mean(), reward_rejected=rejected.mean())


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """
    DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * ((pc - rc) - (pr - rr))), mean over the batch; the
    same values and gradients as TRL's default sigmoid loss, and eq. (1) = eq. (2) of CPO at K = 2.
    All four (B,) sequence log-probs; float32 math. Returns (loss, metrics), cpo_loss's metric names.
    """
    pc, pr, rc, rr = (t.to(_acc(t.dtype)) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if pc.dim() != 1 or not pc.shape == pr.shape == rc.shape == rr.shape:
        raise ValueError(f"dpo_loss needs four (B,) tensors; got {[tuple(t.shape) for t in (pc, pr, rc, rr)]}")
    logits = (pc - rc) - (pr - rr)  # r(y_w) - r(y_l), over beta
    loss = -F.logsigmoid(beta * logits).mean()
    r = beta * torch.stack([pc - rc, pr - rr], 1).detach()  # (B, 2) rewards
    return loss, _reward_metrics(r, torch.ones_like(r, dtype=torch.bool))


def mle_loss(logits, labels, mask, chunk_size=128):
    """L_MLE: the mean token NLL over the masked positions, -sum_t log p(labels) / #masked. Scalar float32."""
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        raise ValueError("mle_loss: mask selects no tokens")
    return -sequence_logprobs_chunked(logits, labels, mask, chunk_size).sum() / n_tokens

# ----------------------------------------------------------------------------- sequence log-probs: the definition

def sequence_logprobs(logits, labels, mask):
    """log pi(y|x) of eqs. (1), (2): the SUM of log p(labels[n, t]) over the positions where mask[n, t].
    logits (N, T, V), logits[:, t] predicting labels[:, t] (callers shift); labels (N, T); mask (N, T) bool,
    by position (an EOS equal to the pad id is still scored). Returns (N,) float32. Builds a float32
    (N, T, V) log-softmax: the fast paths below compute the same numbers without it."""
    logps = logits.log_softmax(-1, dtype=_acc(logits.dtype))  # (N, T, V)
    token_logps = logps.gather(-1, labels.masked_fill(~mask, 0)[..., None]).squeeze(-1)  # (N, T)
    return torch.where(mask, token_logps, 0).sum(-1)  # (N,); where, not *: an unscored -inf must not give NaN

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
    chunk_size None: CHUNK_FLOATS // V tokens, an 8 MB float32 chunk (41 tokens for GPT-2's vocabulary; a small
    vocabulary gets few, large chunks, since per-chunk overhead, not memory, is then what costs).
    hidden (N, T, C) final-normed hidden states; weight (V, C) the output matrix (lm_head.weight).
    Returns (N,) float32, differentiable wrt hidden and weight: the chunked backward remakes each
    chunk's logits and accumulates dW in float32, so the extra memory is dW plus (chunk_size, V) temporaries.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden (N, T, C), weight (V, C) and labels (N, T) disagree: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    chunk_size = chunk_size or max(1, CHUNK_FLOATS // weight.shape[0])
    return _LogprobsFromHidden.apply(hidden, weight, labels, mask, chunk_size)
