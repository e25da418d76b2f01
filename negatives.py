"""
Synthetic negatives for CPO (Feng et al. 2024, section 3): the K-1 continuations that the ground truth
must beat. Four samplers, a spec string that mixes them, cosine ranking for the ranked loss (eq. 2),
and an offline tool that precomputes the expensive autoregressive ones.

    an  autoregressive: top-k (k=50) samples from the model given the prompt     (offline, cached)
    bn  batch:          other rows' ground-truth continuations
    mn  mean-field:     15% of the positions resampled from the model's conditionals (one forward)
    tn  truncation:     a random strict prefix of the ground truth, then EOS
BN and TN need no model: they are pure functions in cpo.py (cpo.batch_negatives, cpo.truncation_negatives).

Every continuation (ground truth or negative) ends with exactly one EOS, as data.py makes them.
In one CPO step, train.cpo_objective calls build_cpo_batch: the (B, K, T) batch the model then scores.

Offline AN cache (write_an_negatives), read back with load_an_cache(dir) -> {example id: [continuation ids]}.
Shards are written atomically; a rerun skips finished ones (resume after a crash, or --max-shards N
to time-box a job); torchrun splits the shards over ranks with the same result as one process:
    python negatives.py --model out/sft --data dolly --split train --spec an:11 --out out/an
    torchrun --standalone --nproc_per_node=8 negatives.py --model out/sft --data dolly --spec an:11 \
        --out out/an
"""
import argparse
import glob
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import cpo
from common import cut_at_eos, number, read_jsonl, write_atomic
from data import load_task, pad_right
from decoding import generate, left_pad
from hf import load, window_len
from model import resolve_device

KINDS = ("an", "bn", "mn", "tn")

# ----------------------------------------------------------------------------- spec and seeds

def parse_spec(spec):
    """'bn:3,mn:5,tn:3' -> [('bn', 3), ('mn', 5), ('tn', 3)]. Columns follow the spec's order."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty negative spec {spec!r}; expected e.g. 'an:11' or 'bn:3,mn:5,tn:3'")
    out = []
    for part in spec.split(","):
        kind, sep, count = part.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown negative kind {kind!r} in spec {spec!r}; "
                             f"choose from {', '.join(KINDS)}")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"bad count in {part.strip()!r} of spec {spec!r}; "
                             f"expected '{kind}:N' with N >= 1")
        if kind in (k for k, _ in out):
            raise ValueError(f"negative kind {kind!r} appears twice in spec {spec!r}")
        out.append((kind, int(count)))
    return out


def make_generator(seed, *keys, device="cpu"):
    """The one way a random stream is seeded here. make_generator(seed): a torch.Generator seeded with seed.
    make_generator(seed, *keys): seeded from a hash of (seed, *keys), so the stream for one example (or one
    shard) depends only on its own keys, never on what other work shares the batch or the rank."""
    g = torch.Generator(device=device)
    if not keys:
        return g.manual_seed(int(seed))
    digest = hashlib.sha256(repr((int(seed),) + tuple(str(k) for k in keys)).encode()).digest()
    return g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _per_row(generator, n_rows):
    """A generator, a list of per-row generators, or None (the global stream) -> a list of n_rows."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == n_rows, f"{len(generator)} generators for {n_rows} rows"
        return list(generator)
    return [generator] * n_rows


@contextmanager
def evaluating(model):
    """no_grad + eval mode, restoring the model's mode afterwards (samplers may get the policy)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)

# ----------------------------------------------------------------------------- AN: autoregressive


def end_with_eos(new_tokens, eos_id):
    """Generated ids -> a continuation ending with exactly one EOS. A row that stopped keeps everything
    up to its first EOS (common.cut_at_eos). A row that ran out of max_new_tokens without EOS keeps its
    first max_new_tokens-1 tokens plus EOS, so no AN continuation is ever longer than max_new_tokens."""
    ids = cut_at_eos(new_tokens, eos_id)
    return ids if ids[-1:] == [eos_id] else ids[:max(len(ids) - 1, 0)] + [eos_id]


def autoregressive_negatives(model, prompt_ids, n, top_k=50, max_new_tokens=128, eos_id=None,
                             generator=None, temperature=1.0, batch_size=None):
    """AN: n continuations per prompt by top-k sampling with the KV cache (decoding.generate). Prompts of
    different lengths share a batch through left padding. Returns, per prompt, n lists of ids, each
    ending with exactly one EOS (see end_with_eos for rows that hit max_new_tokens).
    batch_size: sequences per generate call (None = all prompt_ids * n at once). The generator is
    shared by the whole call, so results depend on the batch's composition: use the offline cache
    (fixed shards) when they must not depend on the number of ranks."""
    eos_id = model.config.eos_id if eos_id is None else eos_id
    assert eos_id is not None, "AN needs an eos_id (none given, none in model.config)"
    device = next(model.parameters()).device
    rows = [list(p) for p in prompt_ids for _ in range(n)]  # a prompt's n samples sit next to each other
    batch_size = batch_size or max(len(rows), 1)
    out = []
    with evaluating(model):
        for s in range(0, len(rows), batch_size):
            idx, mask = left_pad(rows[s:s + batch_size], eos_id)
            steps = min(max_new_tokens, model.config.max_seq_len - idx.shape[1])
            assert steps >= 1, f"prompt of {idx.shape[1]} tokens leaves no room in max_seq_len"
            new = generate(model, idx.to(device), steps, attention_mask=mask.to(device),
                           temperature=temperature, top_k=top_k, eos_id=eos_id, pad_id=eos_id,
                           generator=generator)  # (b, steps), pad after EOS
            out += [end_with_eos(row, eos_id) for row in new.tolist()]
    return [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

# ----------------------------------------------------------------------------- BN: what a batch can supply
# (the sampler itself is cpo.batch_negatives)

def bn_shortfall(continuations, n):
    """BN columns a batch leaves invalid: for each row, how many of its n negatives are missing because the
    batch holds fewer than n distinct continuations other than its own (repeated examples or answers)."""
    others = len(set(tuple(c) for c in continuations)) - 1  # each row's own answer is one of the distinct
    return len(continuations) * max(0, n - others)


def check_bn_satisfiable(n, continuations, batch_size):
    """Refuse, before training, only a BN count n that no batch of this data set could satisfy: a batch holds
    at most min(batch_size, distinct continuations) distinct answers, one of them the row's own."""
    best = min(batch_size, len(set(tuple(c) for c in continuations))) - 1
    if n > best:
        raise ValueError(f"{n} batch negatives asked for, but a batch of {batch_size} from "
                         f"this data set holds at most {best} distinct other continuations")

# ----------------------------------------------------------------------------- MN: mean-field

def meanfield_negatives(model, input_ids, cont_mask, n, fraction=0.15, generator=None, eos_id=None):
    """MN: one forward pass over the ground truth (N, T); for each of n negatives pick exactly
    ceil(fraction * T_cont) eligible positions without replacement and replace each token by a sample
    from the model's conditional at that position given the ground-truth prefix. Returns (N, n, T).
    Eligible: continuation positions except the final EOS (every negative must still end with exactly
    one EOS) and except position 0 (no prefix, no conditional); T_cont counts the eligible ones. For
    the same reason replacements never draw EOS: the conditional is renormalised without it.
    Prompt tokens are never touched. A continuation that is only EOS gets negatives equal to it."""
    N, T = input_ids.shape
    eos_id = model.config.eos_id if eos_id is None else eos_id
    gens = _per_row(generator, N)
    device = next(model.parameters()).device
    with evaluating(model):
        hidden = model(input_ids.to(device), return_hidden=True)  # (N, T, C)
        out = input_ids.cpu().unsqueeze(1).repeat(1, n, 1)  # (N, n, T)
        for i in range(N):
            pos = cont_mask[i].nonzero().squeeze(1)[:-1]  # continuation positions minus the final EOS
            pos = pos[pos > 0].cpu()
            m = math.ceil(fraction * len(pos))
            if m == 0:
                continue
            draws = [pos[torch.randperm(len(pos), generator=gens[i])[:m]] for _ in range(n)]
            pick = torch.stack(draws)  # (n, m): the positions each negative resamples
            logits = model.lm_head(hidden[i, (pick - 1).to(device)]).float()  # (n, m, V): predicts pick
            if eos_id is not None:
                logits[..., eos_id] = float("-inf")
            probs = logits.softmax(-1).view(n * m, -1).cpu()
            tokens = torch.multinomial(probs, 1, generator=gens[i]).view(n, m)
            out[i].scatter_(1, pick, tokens)
    return out

# ----------------------------------------------------------------------------- ranking (eq. 2)

def mean_pooled_embedding(model, input_ids, cont_mask):
    """(N, T) -> (N, C): the model's final (normed) hidden state averaged over continuation tokens."""
    device = next(model.parameters()).device
    with evaluating(model):
        hidden = model(input_ids.to(device), return_hidden=True).float()  # (N, T, C)
    w = cont_mask.to(device).float().unsqueeze(-1)  # (N, T, 1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def rank_by_similarity(embeddings, valid=None):
    """embeddings (B, K, C) with the ground truth in column 0 -> order (B, K): column indices by cosine
    similarity to column 0, most similar first; the ground truth is always first, invalid columns
    (valid (B, K) False) last, ties broken by column index (stable sort)."""
    sim = F.cosine_similarity(embeddings.float(), embeddings[:, :1].float(), dim=-1)  # (B, K)
    if valid is not None:
        sim = sim.masked_fill(~valid.to(sim.device), float("-inf"))
    sim[:, 0] = float("inf")
    return torch.sort(-sim, dim=1, stable=True).indices

# ----------------------------------------------------------------------------- a CPO batch

def build_cpo_batch(examples, spec, model, pad_id, eos_id, generator=None, an_cache=None, ranked=False,
                    embed_fn=mean_pooled_embedding, allow_fewer=False, fraction=0.15,
                    max_new_tokens=None, bn_pool=None, mn_model=None, fixed_negatives=False):
    """examples (data.Example) -> input_ids (B, K, T), cont_mask (B, K, T), valid (B, K), cacheable (B, K),
    on the CPU.
    Column 0 is the ground truth, then the spec's negatives in the spec's order (K = 1 + their sum).
    `model` should be the frozen reference: it samples AN/MN and embeds for ranking.
    Seeds: one draw from `generator` per call, hashed with each example's id and the sampler kind,
    seeds that example's BN/MN/TN negatives, so they don't depend on the rank or the batch it lands in
    (ranks must seed their generators alike and call once per step). BN depends on who else is in the
    batch by definition; AN without an_cache is sampled for the whole batch with one stream.
    valid is False for a negative that couldn't be made (see allow_fewer, cpo.truncation_negatives) or
    that equals the ground truth; such a column holds a copy of the ground truth, so every score is
    finite. ranked=True reorders columns 1.. by rank_by_similarity(embed_fn(model, ids, mask)):
    the column order is then eq. 2's tau. fraction: MN's share of positions; max_new_tokens: AN without
    a cache (default: the longest ground-truth continuation in the batch).
    bn_pool: the continuations BN draws from (default: these examples'; train.py passes the global batch's,
    see cpo.batch_negatives). mn_model: the model MN samples from (default: `model`; train.py passes pi_theta,
    the policy being trained, as §3 defines MN).
    Also returns cacheable (B, K) bool: the sequences that come back, whose log pi_ref may be cached for the
    run (scoring.ReferenceCache): the ground truth and AN read from an_cache always; with fixed_negatives
    (the caller passes the same generator every step) also BN, TN and MN drawn from `model`, never MN drawn
    from another mn_model (the policy changes every step)."""
    counts = parse_spec(spec) if isinstance(spec, str) else list(spec)
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    gts = [list(ex.continuation_ids) for ex in examples]
    rows = [[gt] for gt in gts]  # per example: ground truth, then negatives (None = missing)
    for kind, n in counts:
        gens = [make_generator(base, ex.id, kind) for ex in examples]
        if kind == "an" and an_cache is not None:
            negs = [_from_cache(an_cache, ex.id, n) for ex in examples]
        elif kind == "an":
            device = next(model.parameters()).device
            negs = autoregressive_negatives(model, [ex.prompt_ids for ex in examples], n, eos_id=eos_id,
                                            max_new_tokens=max_new_tokens or max(map(len, gts)),
                                            generator=make_generator(base, "an", device=device))
        elif kind == "bn":
            negs = cpo.batch_negatives(gts, n, gens, allow_fewer=allow_fewer, pool=bn_pool)
        elif kind == "tn":
            negs = [cpo.truncation_negatives(gt, n, eos_id, g) for gt, g in zip(gts, gens)]
        else:  # mn
            ids, mask = pad_right([ex.prompt_ids for ex in examples], gts, pad_id)
            out = meanfield_negatives(mn_model or model, ids, mask, n, fraction, gens,
                                      eos_id=eos_id)  # (B, n, T)
            negs = [[out[i, j][mask[i]].tolist() for j in range(n)] for i in range(len(examples))]
        for row, neg in zip(rows, negs):
            row += neg + [None] * (n - len(neg))
    valid = torch.tensor([[c is not None and (k == 0 or c != row[0]) for k, c in enumerate(row)]
                          for row in rows])  # (B, K)
    prompts = [ex.prompt_ids for ex in examples for _ in rows[0]]
    conts = [c if c is not None else row[0] for row in rows for c in row]
    ids, mask = pad_right(prompts, conts, pad_id)  # (B*K, T)
    B, K = valid.shape
    input_ids, cont_mask = ids.view(B, K, -1), mask.view(B, K, -1)
    comes_back = {"an": an_cache is not None, "bn": fixed_negatives, "tn": fixed_negatives,
                  "mn": fixed_negatives and mn_model in (None, model)}
    cacheable = torch.tensor([True] + [comes_back[kind] for kind, n in counts for _ in range(n)]).repeat(B, 1)
    if ranked:
        order = rank_by_similarity(embed_fn(model, ids, mask).view(B, K, -1), valid).cpu()  # (B, K)
        input_ids = input_ids.gather(1, order[:, :, None].expand_as(input_ids))
        cont_mask = cont_mask.gather(1, order[:, :, None].expand_as(cont_mask))
        valid = valid.gather(1, order)
        cacheable = cacheable.gather(1, order)
    return input_ids, cont_mask, valid, cacheable


def _from_cache(an_cache, example_id, n):
    if example_id not in an_cache:
        raise KeyError(f"example {example_id!r} is not in the AN cache; rebuild it with this data")
    negs = an_cache[example_id]
    if len(negs) < n:
        raise ValueError(f"the AN cache holds {len(negs)} negatives for {example_id!r}, spec asks {n}")
    return [list(c) for c in negs[:n]]

# ----------------------------------------------------------------------------- offline AN cache

def shard_path(out_dir, i):
    return os.path.join(out_dir, f"shard-{i:05d}.jsonl")


def load_an_cache(out_dir):
    """The offline tool's output -> {example id: [continuation ids, ...]}. Raises if shards are missing."""
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    missing = [i for i in range(meta["num_shards"]) if not os.path.exists(shard_path(out_dir, i))]
    if missing:
        example = os.path.basename(shard_path(out_dir, missing[0]))
        raise ValueError(f"{out_dir}: {len(missing)} of {meta['num_shards']} shards missing "
                         f"(e.g. {example}); rerun the tool to finish them")
    cache = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "shard-*.jsonl"))):
        cache.update((row["id"], row["negatives"]) for row in read_jsonl(path))
    return cache


def write_an_negatives(model, data, out, split="train", spec="an:11", max_new_tokens=256, top_k=50,
                       batch_size=64, shard_size=256, seed=0, max_len=None, limit=None, max_shards=None,
                       device=None, temperature=1.0):
    """Sample AN negatives from `model` (an HF folder or hub name: the reference model) for the examples of
    data.load_task(data, split) into out/: meta.json + shard-NNNNN.jsonl of {id, negatives: [[ids...], ...]}.
    Shards already written are skipped (a rerun resumes; max_shards time-boxes one run); under torchrun
    the ranks share the shards (i % world == rank), with the same samples as one process, since each
    shard's stream is make_generator(seed, "an-shard", i). seed is also the synthetic task's, as train.py's.
    max_len: load_task's (default: hf.window_len, the model's training max_len). temperature: the sampling's
    (the paper's AN: 1, top-k 50; lower gives the reference's likelier, harder negatives). ValueError if `out`
    holds other settings' shards."""
    (kind, n), *rest = parse_spec(spec)
    if kind != "an" or rest:
        raise ValueError(f"spec must be an:N (bn/mn/tn are made on the fly in training), got {spec!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device)
    net, tokenizer = load(model, device=device)
    assert tokenizer is not None, f"{model} has no tokenizer files"
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else net.config.eos_id
    examples = load_task(data, split, tokenizer, window_len(model, net, max_len), n=limit, seed=seed)
    num_shards = math.ceil(len(examples) / shard_size)

    # the settings that decide the output; a rerun with other settings must not mix into these shards
    meta = dict(model=model, data=data, split=split, spec=spec, seed=seed, max_new_tokens=max_new_tokens,
                top_k=top_k, batch_size=batch_size, shard_size=shard_size, max_len=max_len, limit=limit,
                num_examples=len(examples), num_shards=num_shards)
    if temperature != 1.0:  # absent at 1: older caches still match
        meta["temperature"] = temperature
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise ValueError(f"{out} holds shards made with other settings {diff}; use another --out")
    else:
        write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")  # every rank writes the same bytes

    mine = [i for i in range(num_shards) if i % world == rank]
    todo = [i for i in mine if not os.path.exists(shard_path(out, i))][:max_shards]
    print(f"rank {rank}/{world}: {len(examples)} examples, {num_shards} shards, {len(mine)} mine, "
          f"{len(mine) - len(todo)} done already, {len(todo)} to do this run", flush=True)
    t0, done = time.time(), 0
    for j, i in enumerate(todo):
        shard = examples[i * shard_size:(i + 1) * shard_size]
        g = make_generator(seed, "an-shard", i, device=device)  # fixed shards: any world size, same samples
        negs = autoregressive_negatives(net, [ex.prompt_ids for ex in shard], n, top_k=top_k,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id, generator=g,
                                        temperature=temperature, batch_size=batch_size)
        rows = [json.dumps({"id": ex.id, "negatives": ng}) + "\n" for ex, ng in zip(shard, negs)]
        write_atomic(shard_path(out, i), "".join(rows))
        done += len(shard)
        rate = done / (time.time() - t0)
        left = sum(len(examples[k * shard_size:(k + 1) * shard_size]) for k in todo[j + 1:])
        print(f"rank {rank}: shard {i} written ({j + 1}/{len(todo)}), {rate:.1f} examples/s, "
              f"ETA {left / rate:.0f}s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Precompute autoregressive (AN) negatives into jsonl shards "
                                "{id, negatives: [[ids...], ...]}. Rerun to resume; torchrun to split "
                                "shards.")
    p.add_argument("--model", required=True,
                   help="HF model folder (or hub name) to sample from: the reference model")
    p.add_argument("--data", required=True,
                   help="task for data.load_task: synthetic | dolly[:src] | wiki:<src> | jsonl:<src>")
    p.add_argument("--split", default="train", help="split of the task (default train)")
    p.add_argument("--spec", default="an:11", help="negatives per example, must be an:N (default an:11)")
    p.add_argument("--out", required=True, help="output folder: meta.json + shard-NNNNN.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest sample incl. its EOS (default 256)")
    p.add_argument("--top-k", type=int, default=50, help="top-k sampling (default 50, the paper's)")
    p.add_argument("--temperature", type=number(float, 0, strict=True), default=1.0,
                   help="sampling temperature, > 0 (default 1, the paper's; lower: likelier, harder "
                        "negatives)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (default 64)")
    p.add_argument("--shard-size", type=int, default=256, help="examples per shard file (default 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed (each shard's stream is hashed from (seed, shard)); also the "
                        "synthetic task's seed, as train.py's --seed: use the same value")
    p.add_argument("--max-len", type=int, default=None,
                   help="data.load_task max_len, as train.py's (default: the max_len the model was trained "
                        "with, from its nanocpo.json, else its context)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of the split")
    p.add_argument("--max-shards", type=int, default=None, help="stop after writing N shards in this run "
                   "(a time-boxed job; rerun to go on)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        cuda = resolve_device(args.device).startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        write_an_negatives(args.model, args.data, args.out, args.split, args.spec, args.max_new_tokens,
                           args.top_k, args.batch_size, args.shard_size, args.seed, args.max_len, args.limit,
                           args.max_shards, args.device, args.temperature)
    except ValueError as e:  # bad settings: one line that says what, not a traceback
        raise SystemExit(f"negatives.py: {e}") from None
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
