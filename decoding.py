"""
Decoding with model.py's preallocated KV cache, as small named steps (the shape of gpt-fast's generate.py).
model.py holds what the network does in a step (new_kv_cache, next_logits, positions_and_mask); this file
decides which tokens to feed it and which to keep.

    new = generate(model, idx, 64, attention_mask=mask, temperature=0)   # (B, 64) new tokens, greedy
    gens = greedy_continuations(model, tok, examples, 64)               # new ids per data.Example

In the order it runs: generate -> prefill (the prompts into a fresh cache) -> decode_n_tokens
(sample_next_token, then decode_one_token, until every row has its EOS), or beam_search.
A row's positions pos (B, S) and attention mask (B, 1, S, S) cover its prompt and every token to come;
the cache has a slot per position, and the token generated at step t goes to slot T + t.

The last section decodes batches of data.Example prompts for evaluate.py, train.py and miniature.py.
"""
import math

import torch
import torch.nn.functional as F

import data
from common import cut_at_eos
from model import positions_and_mask

GREEDY = dict(temperature=0.0, top_k=None, top_p=None, num_beams=1, length_penalty=1.0)


# ----------------------------------------------------------------------------- generate
def left_pad(prompts, pad_id):
    """Prompts (lists of ids) -> idx (B, T) left-padded and attention_mask (B, T), 0 on padding:
    generate's input."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask


@torch.no_grad()
def generate(model, idx, max_new_tokens, *, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
             num_beams=1, length_penalty=1.0, eos_id=None, pad_id=None, generator=None):
    """idx (B, T) prompts, LEFT-padded when attention_mask (B, T) is given -> (B, max_new_tokens) new tokens.
    temperature 0 = greedy. eos_id None = model.config.eos_id (-1: never stop); after a row's EOS come
    pad_id (default eos_id). num_beams > 1: beam search with HF's scoring (sum of log-probs /
    new_length ** length_penalty), returning each row's best hypothesis (sampling arguments are ignored)."""
    B, T = idx.shape
    eos_id, pad_id = stop_and_pad_ids(model.config, eos_id, pad_id)
    if max_new_tokens <= 0:
        return idx.new_full((B, max_new_tokens), pad_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(idx)
    else:
        check_left_padded(attention_mask)
    S = T + max_new_tokens
    model.check_length(S)
    pos, mask = positions_and_mask(attention_mask, S)                  # (B, S), (B, 1, S, S)
    if num_beams > 1:
        return beam_search(model, idx, pos, mask, max_new_tokens, num_beams, length_penalty, eos_id, pad_id)
    return decode_n_tokens(model, idx, pos, mask, max_new_tokens, eos_id, pad_id,
                           temperature, top_k, top_p, generator)


def stop_and_pad_ids(config, eos_id, pad_id):
    """generate's defaults: eos_id None = config.eos_id, and -1 (no token is -1: never stop) when that is
    None too; pad_id None = eos_id (0 when there is no EOS)."""
    eos_id = config.eos_id if eos_id is None else eos_id
    eos_id = -1 if eos_id is None else eos_id
    pad_id = (eos_id if eos_id >= 0 else 0) if pad_id is None else pad_id
    return eos_id, pad_id


def check_left_padded(attention_mask):
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError("generate needs LEFT-padded prompts: each attention_mask row must be 0..0 1..1")


def prefill(model, idx, pos, mask):
    """The prompts idx (B, T) into a fresh cache -> (logits for the first new token (B, V), the cache)."""
    cache = model.new_kv_cache(*pos.shape)
    return model.next_logits(idx, pos, mask, cache, 0), cache


def decode_one_token(model, tok, pos, mask, cache, slot):
    """tok (B,) into cache slot `slot` -> logits for the token after it (B, V)."""
    return model.next_logits(tok[:, None], pos, mask, cache, slot)


def decode_n_tokens(model, idx, pos, mask, n, eos_id, pad_id, temperature, top_k, top_p, generator):
    """Sample n tokens after the prompts idx (B, T) -> (B, n); after a row's EOS comes pad_id."""
    B, T = idx.shape
    out = idx.new_full((B, n), pad_id)
    logits, cache = prefill(model, idx, pos, mask)                     # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for t in range(n):
        tok = sample_next_token(logits, temperature, top_k, top_p, generator)       # (B,)
        tok = tok.masked_fill(done, pad_id)
        done |= tok == eos_id
        out[:, t] = tok
        # asking "all done?" makes the host wait for the device, so only every 8th step
        if t == n - 1 or (t % 8 == 7 and bool(done.all())):
            break
        logits = decode_one_token(model, tok, pos, mask, cache, T + t)
    return out


# ----------------------------------------------------------------------------- sampling
def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next tokens (B,). temperature 0 = greedy (argmax); otherwise a draw from
    logits_to_probs. The only place nanoCPO samples; its use of randomness doesn't depend on the logits'
    values."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs, index = logits_to_probs(logits, temperature, top_k, top_p)  # (B, V or k)
    choice = sample_one_no_sync(probs, generator)                      # (B,)
    return choice if index is None else index.gather(-1, choice[:, None]).squeeze(-1)


def logits_to_probs(logits, temperature, top_k=None, top_p=None):
    """logits (B, V) -> softmax(logits / temperature) over the candidates, and the candidates' token ids
    (None: all V, in order). Restricted first to the top_k logits (a tie at the k-th is broken by
    torch.topk), then to the nucleus: the most likely tokens up to and including the one that brings their
    mass to top_p (HF's order and rule)."""
    logits, index = logits.float() / temperature, None
    if top_k is not None:  # from here on only the k candidates: at V = 50257 and k = 50, 1000x less work
        logits, index = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # (B, k), best first
    if top_p is not None and top_p < 1.0:
        logits, index = keep_nucleus(logits, index, top_p)
    return logits.softmax(dim=-1), index


def keep_nucleus(logits, index, top_p):
    """Candidates' logits (B, N) and ids (or None: all, in order) -> best first, those outside the
    nucleus at -inf: a token is out when the mass of the tokens before it is already >= top_p."""
    if index is None:
        logits, index = logits.sort(dim=-1, descending=True)           # (B, V), best first
    p = logits.softmax(dim=-1)
    return logits.masked_fill(p.cumsum(dim=-1) - p >= top_p, float("-inf")), index


def sample_one_no_sync(probs, generator=None):
    """probs (B, N) -> one draw per row (B,). argmax of p / Exp(1) noise is an exact draw from p (the
    exponential race, = Gumbel-max) and, unlike torch.multinomial, never makes the host wait for the
    device."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator).clamp_(min=1e-30)
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------- beam search
def beam_search(model, idx, pos, mask, n, nb, length_penalty, eos_id, pad_id):
    """HF's beam search with early_stopping=False: nb beams per prompt of idx (B, T) -> each row's best
    hypothesis (B, n). Per step keep the 2 nb best (beam, token) candidates so nb beams stay alive even if
    some end; an ending candidate (EOS, or the last step) among the top nb becomes a finished hypothesis
    scored logp_sum / n_new ** length_penalty, and the nb best finished are kept. A row stops once nb are
    finished and its best live beam, scored at its current length, can't beat the worst of them.
    A score of -inf marks what doesn't count: beams not started, ended candidates, empty finished slots."""
    B, T = idx.shape
    dev, never = idx.device, -math.inf
    rows = torch.arange(B, device=dev).repeat_interleave(nb)           # (B nb,) prompt row of each beam
    pos, mask = pos[rows], mask[rows]
    logits, cache = prefill(model, idx[rows], pos, mask)                # (B nb, V)

    seqs = idx.new_full((B, nb, n), pad_id)                             # live beams
    scores = torch.full((B, nb), never, device=dev)                     # their summed log-probs
    scores[:, 0] = 0.0                                                  # all beams start equal: expand one
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, nb), never, device=dev)  # finished, best first
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    in_top_nb = torch.arange(2 * nb, device=dev) < nb
    for t in range(n):
        cand_scores, beam, cand_seqs = top_candidates(logits, scores, seqs, t)  # (B, 2 nb), .., (B, 2 nb, n)
        ends = (cand_seqs[:, :, t] == eos_id) | (t == n - 1)           # max length ends them all
        # the nb best candidates that didn't end go on
        live = cand_scores.masked_fill(ends, never)
        keep = live.topk(nb).indices                                     # (B, nb)
        seqs, scores, src = take(cand_seqs, keep), take(live, keep), take(beam, keep)
        # the nb best finished hypotheses so far, from the old ones and the ending candidates that count
        counts = ends & in_top_nb & can_improve                         # (B, 2 nb)
        new_scores = (cand_scores / (t + 1) ** length_penalty).masked_fill(~counts, never)
        fin_seqs, fin_scores = best_of(torch.cat([fin_seqs, cand_seqs], dim=1),
                                       torch.cat([fin_scores, new_scores], dim=1), nb)
        if t == n - 1:
            break
        worst = fin_scores[:, -1:]                                       # (B, 1), -inf until nb are finished
        can_improve &= scores[:, :1] / (t + 1) ** length_penalty > worst
        if not bool(can_improve.any()):
            break
        cache = reorder_cache(cache, src)
        logits = decode_one_token(model, seqs[:, :, t].reshape(-1), pos, mask, cache, T + t)  # (B nb, V)
    return fin_seqs[:, 0]


def top_candidates(logits, scores, seqs, t):
    """Every live beam extended by every token: logits (B nb, V), scores (B, nb), seqs (B, nb, n) -> the
    2 nb best candidates of each row, best first: summed log-probs (B, 2 nb), the beam each extends
    (B, 2 nb) and its sequence with the new token at step t (B, 2 nb, n)."""
    (B, nb), V = scores.shape, logits.shape[-1]
    logp = F.log_softmax(logits.float(), dim=-1).view(B, nb, V) + scores[..., None]  # (B, nb, V)
    cand_scores, cand = logp.view(B, nb * V).topk(2 * nb)              # (B, 2 nb)
    beam, tok = cand // V, cand % V
    cand_seqs = take(seqs, beam)                                        # (B, 2 nb, n)
    cand_seqs[:, :, t] = tok
    return cand_scores, beam, cand_seqs


def reorder_cache(cache, src):
    """Each beam's cache rows become those of the beam it extends: src (B, nb) beams within each row."""
    B, nb = src.shape
    flat = (src + torch.arange(B, device=src.device)[:, None] * nb).view(-1)  # (B nb,) cache rows
    return [(k[flat], v[flat]) for k, v in cache]


def best_of(seqs, scores, k):
    """seqs (B, J, n), scores (B, J) -> the k best of each row (B, k, n), (B, k), best first."""
    best = scores.topk(k).indices
    return take(seqs, best), take(scores, best)


def take(x, i):
    """x (B, K, ...), i (B, J) -> x[b, i[b, j]] (B, J, ...): pick beams/candidates per row."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], i]


# ----------------------------------------------------------------------------- batches of examples
def decoding_label(d):
    """A short name for a decoding config (GREEDY's keys), for file names and the report."""
    if d["num_beams"] > 1:
        return f"beam{d['num_beams']}"
    if d["temperature"] == 0:
        return "greedy"
    filters = [f"top-k{d['top_k']}" if d["top_k"] else "", f"top-p{d['top_p']:g}" if d["top_p"] else ""]
    return f"{'-'.join(f for f in filters if f) or 'sample'}-T{d['temperature']:g}"


def generate_batch(net, tok, prompts, max_new_tokens, decoding, generator=None):
    """Prompts (lists of ids, BOS included as data.py makes them) -> the new ids of each, as generated
    (EOS and the padding after it included). Left-padded into one (B, T) batch with its attention mask;
    a prompt that would not leave room for max_new_tokens within the model's context is cut from the
    left, keeping its BOS, as data.py cuts prompts. decoding: generate's keyword arguments (GREEDY's keys)."""
    room = net.config.max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"{net.config.max_seq_len} positions")
    bos = tok.bos_id is not None
    prompts = [data.cut_prompt_left(p, room, keep_bos=bos) for p in prompts]
    idx, mask = left_pad(prompts, tok.pad_id)                           # (B, T) each
    device = net.tok_emb.weight.device
    out = generate(net, idx.to(device), max_new_tokens, attention_mask=mask.to(device), eos_id=tok.eos_id,
                   pad_id=tok.pad_id, generator=generator, **decoding)  # (B, max_new_tokens)
    return out.tolist()


def greedy_continuations(net, tok, examples, max_new_tokens, batch_size=32):
    """Greedy new ids for each example's prompt, batch_size prompts per generate call."""
    gens = []
    for s in range(0, len(examples), batch_size):
        prompts = [e.prompt_ids for e in examples[s:s + batch_size]]
        gens += generate_batch(net, tok, prompts, max_new_tokens, GREEDY)
    return gens


def new_text(tok, ids):
    """Decoded new tokens up to, not including, the first EOS."""
    ids = cut_at_eos(ids, tok.eos_id)
    return tok.decode(ids[:-1] if tok.eos_id in ids else ids)


def task_scores(model, tok, examples, task, batch_size=32, max_new_tokens=None):
    """Greedy continuations of held-out examples -> {metric: value}, for train.py's summary table.
    synthetic: data.score_synthetic's exact metrics; other tasks: the share that stopped and their
    mean length in new tokens (quality there needs the judge or MAUVE)."""
    if max_new_tokens is None:
        max_new_tokens = data.synthetic_max_new_tokens(task) if task.startswith("synthetic") else 256
    gens = greedy_continuations(model, tok, examples, max_new_tokens, batch_size)
    if task.startswith("synthetic"):
        return data.score_synthetic(gens, [e.continuation_ids for e in examples], tok.eos_id)
    lengths = [len(cut_at_eos(g, tok.eos_id)) for g in gens]
    return {"stopped": sum(tok.eos_id in g for g in gens) / len(gens),
            "mean_new_tokens": sum(lengths) / len(lengths)}
