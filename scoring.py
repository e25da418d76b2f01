"""
The two optimisations of a CPO step, beside the plain path they must equal (train.sequence_logps: every
prompt + continuation run whole, and pi_ref scored every step). Each changes the cost, never the numbers;
tests/test_shared_prompt.py proves each equal to the plain path.

- shared_prompt_logps: the K sequences of an example share its prompt, so run the prompt once and let its K
  continuations attend to it (model.Transformer.forward_shared_prompt). A prompt's cost is paid once, not K
  times: on Dolly, where prompts are long and answers short, that is most of a step. (--shared_prompt)
- ReferenceCache: log pi_ref of a sequence that comes back (a ground truth every epoch, an AN negative read
  from the offline cache) is computed once per run and looked up afterwards. Negatives drawn afresh each step
  are never stored: they would only grow it.
"""
import hashlib

import torch

import cpo

# ----------------------------------------------------------------------------- the shared-prompt forward


def split_prompts(ids, mask):
    """(B, K, T) right-padded prompt + continuation rows, the K of an example sharing its prompt -> the
    prompts (B, P) LEFT-padded with their 0/1 mask (B, P), the continuations (B, K, S) right-padded with
    their bool mask (B, K, S) (model.Transformer.forward_shared_prompt's input), and the prompt lengths
    (B,)."""
    B, K, T = ids.shape
    n_prompt = mask.int().argmax(-1)  # (B, K): the first continuation position = the prompt's length
    n_cont = mask.sum(-1)  # (B, K)
    in_prompt = torch.arange(T, device=ids.device) < n_prompt[..., None]  # (B, K, T)
    prompt_ids = ids[:, :1] * in_prompt  # (B, K, T): each row's prompt, 0 past it
    if (n_prompt != n_prompt[:, :1]).any() or (prompt_ids != prompt_ids[:, :1]).any():
        raise ValueError("split_prompts: the K sequences of an example must share one prompt")
    n_prompt = n_prompt[:, 0]  # (B,)
    P, S = int(n_prompt.max()), int(n_cont.max())
    src = n_prompt[:, None] - P + torch.arange(P, device=ids.device)  # (B, P): prompt position per column
    prompt_mask = (src >= 0).long()
    prompt = ids[:, 0].gather(1, src.clamp(min=0)) * prompt_mask  # (B, P), 0 on the left padding
    src = (n_prompt[:, None, None] + torch.arange(S, device=ids.device)).clamp(max=T - 1).expand(B, K, S)
    cont_mask = torch.arange(S, device=ids.device) < n_cont[..., None]  # (B, K, S)
    return prompt, prompt_mask, ids.gather(2, src) * cont_mask, cont_mask, n_prompt


def shared_prompt_logps(model, ids, mask, device=None):
    """train.sequence_logps of (B, K, T) groups -> (B, K), each prompt run once for its K continuations.
    Give ids and mask on the CPU, where splitting them off their prompts (shape checks, lengths) makes the
    device wait for nothing; the pieces then go to `device` (default: ids' own). Every prompt must have at
    least one token (nothing predicts a first token without one): train.group_logps checks that first."""
    B, K, T = ids.shape
    device = ids.device if device is None else device
    prompt, prompt_mask, cont, cont_mask, n_prompt = split_prompts(ids, mask)
    if int(n_prompt.min()) == 0:
        raise ValueError("shared_prompt_logps: an empty prompt; score such groups whole")
    prompt, prompt_mask, cont, cont_mask = (x.to(device) for x in (prompt, prompt_mask, cont, cont_mask))
    net = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    net = getattr(net, "module", net)  # DDP's
    net.check_length(T - 1)  # the plain path's rows; past them forward_shared_prompt sees only padding
    h_p, h_c = model(prompt, return_hidden=True, attention_mask=prompt_mask, continuations=cont)
    # h_p (B, P, C), h_c (B, K, S, C). The prompt's last hidden state predicts each continuation's first
    # token; h_c[:, :, s] predicts token s + 1 of its continuation.
    first = h_p[:, None, -1:].expand(B, K, 1, h_p.shape[-1])  # (B, K, 1, C)
    hidden = torch.cat([first, h_c[:, :, :-1]], dim=2)  # (B, K, S, C), hidden[:, :, s] predicts cont[:, :, s]
    logps = cpo.sequence_logprobs_from_hidden(hidden.flatten(0, 1), net.lm_head.weight,
                                              cont.flatten(0, 1), cont_mask.flatten(0, 1))  # (B K,)
    return logps.view(B, K)

# ----------------------------------------------------------------------------- the reference cache


def sequence_keys(ids, mask):
    """(N, T) sequences -> N keys: a 16-byte hash of each sequence's tokens up to its last scored
    one."""
    ends = (mask.cumsum(1).argmax(1) + 1).tolist()  # position after the last continuation token
    return [hashlib.blake2b(ids[i, :e].numpy().tobytes(), digest_size=16).digest()
            for i, e in enumerate(ends)]


class ReferenceCache:
    """log pi_ref of the sequences that come back, scored once per run. `entries` maps a sequence's key
    (sequence_keys) to its log pi_ref; checkpoints save it, so a resumed run reads back the very numbers the
    uninterrupted run would (recomputed in another batch, with other padding, they can differ in the last
    bit). Used in two steps around pi_ref's forward pass, which stays the caller's (train.reference_logps):
    lookup says which groups need it, fill puts its scores and the cached values together."""

    def __init__(self, entries=None):
        self.entries = {} if entries is None else entries

    def lookup(self, ids, mask, cacheable):
        """(B, K, T) groups and their (B, K) cacheable mask -> (the B*K sequence keys, the rows b to score):
        those with any sequence that is not cacheable or not cached yet (a row is scored whole, its prompt
        run once)."""
        B, K, _ = ids.shape
        keys = sequence_keys(ids.flatten(0, 1), mask.flatten(0, 1))
        known = [c and k in self.entries for c, k in zip(cacheable.flatten().tolist(), keys)]
        return keys, [b for b in range(B) if not all(known[b * K:(b + 1) * K])]

    def fill(self, keys, cacheable, rows, scores, device):
        """lookup's keys and rows -> the (B, K) log pi_ref of every group, on `device`: scores (len(rows), K)
        for `rows` (None when there are none), the cache for the others. The cacheable sequences among the
        scored ones are stored."""
        B, K = cacheable.shape
        out = [[self.entries.get(keys[b * K + k]) for k in range(K)] for b in range(B)]
        for b, row in zip(rows, [] if scores is None else scores.tolist()):
            out[b] = row
            for k, value in enumerate(row):
                if cacheable[b, k]:
                    self.entries[keys[b * K + k]] = value
        return torch.tensor(out, device=device)
