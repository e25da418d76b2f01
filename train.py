r"""
Train a language model with MLE or with sequence-level Contrastive Preference Optimization
(Feng et al. 2024), on a laptop CPU or on many GPUs.

    python train.py                                    # the embedded CPU default (see config/default.py)
    python train.py --init_from=FOLDER --task=jsonl:FILE --objective=cpo   # ONE run: flags, no preset
    python train.py config/dolly_gpt2xl_mle.py         # one run of the paper
    python train.py config/dolly_gpt2xl_mixnr.py --steps=200 --lr=2e-5     # flags override the preset
    torchrun --standalone --nproc_per_node=8 train.py config/dolly_gpt2xl_mixnr.py
    # 2 nodes x 8 GPUs: run this on every node, HOST being node 0's address
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=cpo --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/dolly_gpt2xl_mixnr.py

One CPO step, top to bottom, each function calling the next:
  train_step                          this rank's micro-batches of the global batch; backward on each
  cpo_objective                       one micro-batch of B examples
  negatives.build_cpo_batch           each example's ground truth and K-1 negatives: (B, K, T) ids, masks
  sequence_logps                      the model's forward pass to its final hidden states (model.py)
  shared_prompt_logps                 the same, each prompt run once for its K continuations (--shared_prompt)
  cpo.sequence_logprobs_from_hidden   log pi(y|x) of the B*K sequences, policy and (cached) reference
  cpo.cpo_loss                        eq. (1), or eq. (2) with --ranked
then train() clips the gradient norm and steps AdamW.
"""
import copy
import gc
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cpo
import data
import decoding
import fsdp
import negatives
import plan
from checkpoint import all_ranks, barrier, checkpoints, restore_checkpoint, resume_newest, save_checkpoint
from common import cut_at_eos, write_atomic
from hf import load, save_pretrained
from settings import Config, load_preset, parse_args, validate_config
from model import ModelConfig, Transformer
from tokenizer import byte_tokenizer


@dataclass
class Runtime:
    """What the objectives need besides cfg, set up once per run (train() below): where and how to compute,
    the tokenizer's ids, and the run's caches."""
    device: torch.device
    rank: int = 0
    autocast: Any = field(default_factory=nullcontext)  # torch.autocast(...) under bf16, else a no-op
    pad_id: int = 0
    eos_id: int = 0
    ref_cache: dict | None = field(default_factory=dict)  # sequence key -> log pi_ref (None: no cache)
    an_cache: dict | None = None  # example id -> AN negatives (negatives.load_an_cache)
    rejected: dict | None = None  # example id -> DPO's rejected Example (data.load_rejected)
    batch: list = field(default_factory=list)  # this step's whole global batch (Examples): BN's pool
    step: int = 0  # the optimisation step being computed: it seeds the step's negatives
    shared_prompt: bool = True  # cpo/dpo: score (B, K, T) groups with the shared-prompt forward


# ----------------------------------------------------------------------------- distributed

def setup(cfg):
    """Returns (rank, world, device). torchrun sets RANK/WORLD_SIZE; NCCL on CUDA, gloo on CPU."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def all_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------- models

def build_model(cfg):
    """The policy's starting weights (float32) and the tokenizer; see starting_model."""
    return starting_model(cfg)[:2]


def starting_model(cfg):
    """(model, tokenizer, the checkpoint's own dtype). The model is float32 whatever the checkpoint holds: the
    master weights AdamW updates (at lr 1e-5 a 16-bit weight would not move, its update below one ulp, or its
    exp_avg_sq would underflow). CUDA computes under bf16 autocast."""
    if cfg.init_from != "scratch":
        model, tok = load(cfg.init_from)
        dtype = next(model.parameters()).dtype
        return model.float(), tok, dtype
    tok = byte_tokenizer()
    config = ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_kv_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=4 * cfg.n_embd, max_seq_len=cfg.max_len,
                         norm_eps=1e-5, tie_word_embeddings=True, bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(cfg.seed)  # the initial weights come from torch's global stream
    return Transformer(config), tok, torch.float32


def frozen_copy(model, dtype=torch.float32):
    """pi_ref: the starting weights, frozen. Never trained, never wrapped in DDP."""
    ref = copy.deepcopy(model).to(dtype).eval()
    ref.requires_grad_(False)
    return ref


def unwrap(model):
    """The Transformer inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def sequence_logps(model, ids, mask):
    """log pi(y|x) of every sequence (N,): the sum over continuation tokens (the paper's reward uses the sum),
    straight from the final hidden states, so the (N, T, V) logits never exist."""
    hidden = model(ids[:, :-1], return_hidden=True)  # (N, T-1, C)
    return cpo.sequence_logprobs_from_hidden(hidden, unwrap(model).lm_head.weight, ids[:, 1:], mask[:, 1:])


def shared_prompt_logps(model, ids, mask, device=None):
    """sequence_logps of (B, K, T) sequences -> (B, K), each prompt run once for its K continuations
    (model.Transformer.forward_shared_prompt): the same numbers, a prompt's cost paid once instead of K times.
    Give ids and mask on the CPU, where splitting them off their prompts (shape checks, lengths) makes the
    device wait for nothing; the pieces then go to `device` (default: ids' own)."""
    B, K, T = ids.shape
    device = ids.device if device is None else device
    prompt, prompt_mask, cont, cont_mask, n_prompt = negatives.split_prompts(ids, mask)
    if int(n_prompt.min()) == 0:  # nothing predicts a first token without a prompt; the naive path skips it
        return sequence_logps(model, ids.flatten(0, 1).to(device), mask.flatten(0, 1).to(device)).view(B, K)
    prompt, prompt_mask, cont, cont_mask = (x.to(device) for x in (prompt, prompt_mask, cont, cont_mask))
    unwrap(model)._check_length(T - 1)  # the naive path's rows; past them forward_shared_prompt sees only padding
    h_p, h_c = model(prompt, return_hidden=True, attention_mask=prompt_mask, continuations=cont)  # (B, P, C), (B, K, S, C)
    # the prompt's last hidden state predicts each continuation's first token, h_c[:, :, s] the token s + 1
    hidden = torch.cat([h_p[:, None, -1:].expand(B, K, 1, h_p.shape[-1]), h_c[:, :, :-1]], dim=2)  # (B, K, S, C)
    return cpo.sequence_logprobs_from_hidden(hidden.flatten(0, 1), unwrap(model).lm_head.weight,
                                             cont.flatten(0, 1), cont_mask.flatten(0, 1)).view(B, K)


def sequence_keys(ids, mask):
    """The key of the reference cache: a 16-byte hash of the sequence's tokens up to its EOS."""
    ends = (mask.cumsum(1).argmax(1) + 1).tolist()  # position after the last continuation token
    return [hashlib.blake2b(ids[i, :e].numpy().tobytes(), digest_size=16).digest() for i, e in enumerate(ends)]


@torch.no_grad()
def reference_logps(ref, ids, mask, cache, device, autocast, cacheable=None):
    """log pi_ref(y|x) of (N, T) sequences (N,), or of (B, K, T) groups sharing a prompt (B, K), each prompt
    run once (shared_prompt_logps). With a cache, each distinct sequence is scored once for the whole run: the
    ground truths, AN, TN (and MN from pi_ref) negatives are a pure function of (seed, example), so they come
    back every epoch; BN negatives recur when two examples share a batch again. A row (a sequence, or a group)
    with any sequence not cached is scored whole; the keys are the same sequence hashes either way. Sequences
    whose cacheable (ids' shape without T) is False are scored afresh and never stored (MN from the policy:
    new every step, they would only grow the cache)."""
    def score(rows):  # log pi_ref of ids[rows], on the device
        if ids.dim() == 3:
            return shared_prompt_logps(ref, ids[rows], mask[rows], device)
        return sequence_logps(ref, ids[rows].to(device), mask[rows].to(device))

    if cache is None:
        with autocast:
            return score(slice(None)).float()
    keys = sequence_keys(ids.flatten(0, -2), mask.flatten(0, -2))
    K = len(keys) // len(ids)  # sequences per row of ids: 1, or a group's K
    fresh = [False] * len(keys) if cacheable is None else (~cacheable.flatten().bool()).tolist()
    stale = [fresh[j] or keys[j] not in cache for j in range(len(keys))]
    missing = [i for i in range(len(ids)) if any(stale[i * K:(i + 1) * K])]
    run_forward = bool(missing)
    if fsdp.is_sharded(ref):
        # A sharded pi_ref all-gathers its weights inside the forward, a collective: every rank runs it or
        # none does, whatever its own cache holds (one rank skipping it is a gloo abort, a NCCL hang).
        run_forward = not all_ranks(not run_forward, device)
    scored = {}
    if run_forward:
        rows = missing or [0]  # a rank with every row cached scores one anyway, only to join the all-gather
        with autocast:
            scores = score(rows).float().flatten().tolist()
        scored = dict(zip([i * K + j for i in missing for j in range(K)], scores))
        cache.update((keys[j], s) for j, s in scored.items() if stale[j] and not fresh[j])
    logps = [scored[j] if stale[j] else cache[k] for j, k in enumerate(keys)]
    return torch.tensor(logps, device=device).view(ids.shape[:-1])


# ----------------------------------------------------------------------------- objectives
# Each returns (the loss summed over this micro-batch's units, metrics); the loop divides by the
# global batch's units (examples for cpo/dpo, continuation tokens for mle/pss), so the gradient is the
# same for any split into ranks and micro-steps.

def mle_objective(cfg, policy, ref, examples, rt, micro_id):
    """Next-token NLL of the continuation tokens."""
    ids, mask = data.collate(examples, rt.pad_id)  # (B, T)
    return -sequence_logps(policy, ids.to(rt.device), mask.to(rt.device)).sum(), {"tokens": ids.numel()}


def score_sequences(policy, ref, ids, mask, rt, cacheable=None):
    """log pi_theta and log pi_ref of (B, K, T) sequences -> two (B, K) tensors (rt.shared_prompt: each prompt
    run once); cacheable (B, K): see reference_logps."""
    B, K, T = ids.shape
    if rt.shared_prompt:
        policy_logps = shared_prompt_logps(policy, ids, mask, rt.device)
        ref_logps = reference_logps(ref, ids, mask, rt.ref_cache, rt.device, rt.autocast, cacheable)
    else:
        ids, mask = ids.view(B * K, T), mask.view(B * K, T)
        cacheable = None if cacheable is None else cacheable.reshape(B * K)
        policy_logps = sequence_logps(policy, ids.to(rt.device), mask.to(rt.device)).view(B, K)
        ref_logps = reference_logps(ref, ids, mask, rt.ref_cache, rt.device, rt.autocast, cacheable).view(B, K)
    if not torch.isfinite(policy_logps).all():  # the model diverged; the loop stops the run cleanly
        raise FloatingPointError("the policy's log-probs are NaN or inf")
    return policy_logps, ref_logps


def cpo_objective(cfg, policy, ref, examples, rt, micro_id):
    """Eq. (1), or eq. (2) with cfg.ranked: each ground truth against its K-1 synthetic negatives."""
    ids, mask, valid, kinds = cpo_batch(cfg, policy, ref, examples, rt)
    cacheable = reference_cacheable(kinds, cfg)
    policy_logps, ref_logps = score_sequences(policy, ref, ids, mask, rt, cacheable)
    # An example all of whose negatives equal its ground truth (a good model's AN or MN samples of a short
    # answer can) has nothing to contrast: it sits out this step, adding zero to the summed loss.
    keep = valid[:, 1:].any(1)  # (B,), on the CPU: no sync
    if not keep.any():
        return 0.0 * policy_logps.sum(), {"tokens": ids.numel()}
    device, kept = rt.device, keep.to(rt.device)
    loss, metrics = cpo.cpo_loss(policy_logps[kept], ref_logps[kept], beta=cfg.beta, ranked=cfg.ranked,
                                 valid=valid[keep].to(device), mle_weight=cfg.mle_weight,
                                 gt_tokens=mask[keep, 0].sum(-1).to(device))
    return loss * int(keep.sum()), {**metrics, **logp_diagnostics(policy_logps[kept], valid[keep].to(device)),
                                    "tokens": ids.numel()}


def logp_diagnostics(policy_logps, valid=None):
    """Mean log pi_theta of the ground truths (column 0) and of the valid negatives (all, without `valid`): if
    both fall while the margin grows, the loss is being won by pushing everything down (DPO's known failure)."""
    lp = policy_logps.detach()  # (B, K)
    if valid is None:
        return {"logp_truth": lp[:, 0].mean(), "logp_negatives": lp[:, 1:].mean()}
    neg = valid[:, 1:]
    return {"logp_truth": lp[:, 0].mean(), "logp_negatives": (lp[:, 1:] * neg).sum() / neg.sum().clamp(min=1)}


def negatives_generator(cfg, step):
    """The stream a step's negatives are drawn from. The paper's loss is an expectation over negatives, so TN
    cuts, MN positions and draws and BN picks are drawn afresh each step, from (seed, step) and, inside
    build_cpo_batch, each example's id: the same for any world size and micro-batch split, and on --resume.
    --fixed_negatives: one draw per example for the whole run (the same negatives every epoch)."""
    return negatives.make_generator(cfg.seed) if cfg.fixed_negatives else negatives.make_generator(cfg.seed, "step", step)


def reference_cacheable(kinds, cfg):
    """(B, K) kinds -> (B, K) bool: which sequences' log pi_ref may be cached for the run, because they come
    back. Ground truths (kind 0) and AN negatives read from the offline cache always; with fixed negatives
    also BN, TN and MN from pi_ref. Negatives drawn afresh each step, and MN from the policy, would only
    grow the cache."""
    if cfg.fixed_negatives:
        return (kinds != 1 + negatives.KINDS.index("mn")) | (cfg.mn_model == "ref")
    return (kinds == 0) | ((kinds == 1 + negatives.KINDS.index("an")) & bool(cfg.an_cache))


def cpo_batch(cfg, policy, ref, examples, rt):
    """-> (B, K, T) ids, masks, (B, K) valid, kinds. BN from the global batch rt.batch (negatives.batch_negatives)."""
    return negatives.build_cpo_batch(
        examples, cfg.negatives, ref, pad_id=rt.pad_id, eos_id=rt.eos_id,
        generator=negatives_generator(cfg, rt.step),
        an_cache=rt.an_cache, ranked=cfg.ranked, allow_fewer=True, return_kinds=True,
        bn_pool=[e.continuation_ids for e in rt.batch or examples],
        mn_model=unwrap(policy) if cfg.mn_model == "policy" else ref)  # column 0 the ground truth


def dpo_objective(cfg, policy, ref, examples, rt, micro_id):
    """DPO's Bradley-Terry loss: the ground truth against one rejected response per prompt."""
    rejected = [rt.rejected[e.id] for e in examples]
    ids, mask = data.collate([e for pair in zip(examples, rejected) for e in pair], rt.pad_id)  # (2B, T)
    policy_logps, ref_logps = score_sequences(policy, ref, ids.view(len(examples), 2, -1), mask.view(len(examples), 2, -1), rt)
    loss, metrics = cpo.dpo_loss(policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0], ref_logps[:, 1], cfg.beta)
    return loss * len(examples), {**metrics, **logp_diagnostics(policy_logps), "tokens": ids.numel()}


def pss_objective(cfg, policy, ref, examples, rt, micro_id):
    """Parallel scheduled sampling (Duckworth et al. 2019, "Parallel Scheduled Sampling"): a teacher-forced
    pass samples a token at every position; each continuation input token is replaced by its sample with
    probability p; a second pass on the mixed inputs is trained against the ground-truth targets."""
    step, j = micro_id
    device = rt.device
    ids, mask = data.collate(examples, rt.pad_id)
    ids, mask = ids.repeat(cfg.pss_samples, 1).to(device), mask.repeat(cfg.pss_samples, 1).to(device)  # (S*B, T)
    p = cfg.pss_p * min(1.0, (step + 1) / cfg.pss_warmup_steps) if cfg.pss_warmup_steps else cfg.pss_p
    seed = int(np.random.SeedSequence([cfg.seed, step, j]).generate_state(1)[0])  # one stream per micro-batch
    gen = negatives.make_generator(seed, device=device)
    with torch.no_grad():
        logits = unwrap(policy)(ids[:, :-1]).float()  # (N, T-1, V): logits[:, t] predicts token t+1
        samples = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1, generator=gen).view(ids.shape[0], -1)
    replace = mask[:, 1:] & (torch.rand(samples.shape, generator=gen, device=device) < p)  # continuation positions only
    mixed = torch.cat([ids[:, :1], torch.where(replace, samples, ids[:, 1:])], dim=1)
    hidden = policy(mixed[:, :-1], return_hidden=True)  # (N, T-1, C), inputs from the mix...
    logps = cpo.sequence_logprobs_from_hidden(hidden, unwrap(policy).lm_head.weight, ids[:, 1:], mask[:, 1:])  # ...targets the truth
    return -logps.sum(), {"tokens": mixed.numel()}


OBJECTIVES = {"mle": mle_objective, "cpo": cpo_objective, "dpo": dpo_objective, "pss": pss_objective}
UNITS = {  # what the loss is averaged over in a global batch
    "mle": lambda cfg, batch: sum(len(e.continuation_ids) for e in batch),
    "pss": lambda cfg, batch: cfg.pss_samples * sum(len(e.continuation_ids) for e in batch),
    "cpo": lambda cfg, batch: len(batch),
    "dpo": lambda cfg, batch: len(batch),
}


# ----------------------------------------------------------------------------- optimisation

def make_optimizer(model, cfg, device):
    """AdamW as in the paper; no weight decay on biases and norm weights (the 1-d parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def lr_at(step, cfg):
    """Linear warm-up, then constant or cosine down to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    return cfg.lr


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_set(cfg, tok):
    """--val_task's examples (all rows of a jsonl: file), else --task's test split (empty for your own
    jsonl unless --val_fraction holds rows out): the first n_val."""
    if cfg.val_task:
        split = "all" if cfg.val_task.startswith("jsonl:") else "test"
        return data.load_task(cfg.val_task, split, tok, cfg.max_len, n=cfg.n_val, seed=cfg.seed)[:cfg.n_val]
    return data.load_task(cfg.task, "test", tok, cfg.max_len, n=cfg.n_val, seed=cfg.seed,
                          val_fraction=cfg.val_fraction)[:cfg.n_val]


def heldout_loss(model, examples, pad_id, device, autocast, batch_size=32):
    """Mean next-token NLL of the held-out continuations."""
    nll, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask = data.collate(examples[i:i + batch_size], pad_id)
        with autocast:
            nll -= sequence_logps(model, ids.to(device), mask.to(device)).sum().item()
        tokens += int(mask[:, 1:].sum())
    return nll / max(tokens, 1)


# ----------------------------------------------------------------------------- the loop

DIAGNOSTICS = ("reward_accuracy", "reward_margin", "logp_truth", "logp_negatives")  # cpo/dpo, per example


def train_step(cfg, policy, ref, micro, rt, step, units, world):
    """Forward and backward over this rank's micro-batches of one global batch (the optimizer steps
    outside). Returns the global sums of the loss and of each of DIAGNOSTICS over the examples, and the
    tokens this rank's policy processed."""
    device, accum, rank = rt.device, len(micro), rt.rank
    sums, tokens, zero = torch.zeros(1 + len(DIAGNOSTICS), device=device), 0, torch.zeros((), device=device)
    for m, examples in enumerate(micro):
        # DDP all-reduces the gradients on the last micro-step only, and must know it before the forward
        with fsdp.grad_sync(policy, m == accum - 1), rt.autocast:
            loss_sum, metrics = OBJECTIVES[cfg.objective](cfg, policy, ref, examples, rt, (step, rank * accum + m))
        (loss_sum * world / units).backward()  # DDP averages over ranks: this makes it the global batch's mean
        sums += torch.stack([loss_sum.detach().float()] + [len(examples) * metrics.get(k, zero) for k in DIAGNOSTICS])
        tokens += metrics["tokens"]
    return all_sum(sums).tolist(), tokens


def train(cfg):
    """One run: cfg.steps optimisation steps of cfg.objective from cfg.init_from. Returns the final model's folder."""
    validate_config(cfg)
    rank, world, device = setup(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    final_dir = os.path.join(cfg.out_dir, "final")
    accum, rem = divmod(cfg.batch_size, cfg.micro_batch_size * world)
    if rem or accum == 0:
        raise SystemExit(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {cfg.micro_batch_size} x world size {world}")
    if cfg.objective not in OBJECTIVES:
        raise SystemExit(f"unknown objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")

    shard = cfg.fsdp and world > 1  # a preset's --fsdp run in one process (a test, a stand-in model): nothing to shard
    if cfg.fsdp and not shard:
        log("--fsdp: one process, nothing to shard; training unsharded")
    plan.check(cfg, world, device, log)  # before any weights are read: stops here if the run cannot fit
    model, tok, start_dtype = starting_model(cfg)
    model.checkpoint_blocks = cfg.activation_checkpointing
    ref_dtype = torch.bfloat16 if cfg.ref_dtype == "bfloat16" and device.type == "cuda" else torch.float32
    ref = frozen_copy(model, ref_dtype) if cfg.objective in ("cpo", "dpo") else None
    train_set = data.load_task(cfg.task, "train", tok, cfg.max_len, n=cfg.n_train or None, seed=cfg.seed,
                               val_fraction=cfg.val_fraction)
    if not train_set:
        raise SystemExit(f"task {cfg.task!r}: no training examples (an empty file, or every example dropped: see the counts above)")
    bn = dict(negatives.parse_spec(cfg.negatives)).get("bn", 0) if cfg.objective == "cpo" else 0
    negatives.check_bn_satisfiable(bn, [e.continuation_ids for e in train_set], cfg.batch_size)
    val_set = heldout_set(cfg, tok)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    model.to(device)
    if ref is not None:
        ref.to(device)
    if shard:  # before the optimizer, which must see the sharded parameters
        fsdp.shard(model, device)
        if ref is not None:
            fsdp.shard(ref, device)
    save, restore = (fsdp.save, fsdp.restore) if shard else (save_checkpoint, restore_checkpoint)
    optimizer = make_optimizer(model, cfg, device)
    rt = Runtime(device=device, rank=rank, autocast=autocast, pad_id=tok.pad_id, eos_id=tok.eos_id, shared_prompt=cfg.shared_prompt,
                 an_cache=negatives.load_an_cache(cfg.an_cache) if cfg.an_cache else None,
                 rejected=data.load_rejected(cfg.dpo_rejected, train_set, tok, cfg.max_len) if cfg.objective == "dpo" else None)

    start = 0
    if cfg.resume and checkpoints(cfg.out_dir):
        start, rt.ref_cache = resume_newest(cfg, model, optimizer, rank, log, restore)
        log(f"resumed from {cfg.out_dir} at step {start}")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(asdict(cfg), indent=2))
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"{cfg.objective} on {cfg.task}: {len(train_set)} training examples, {world} rank(s) x {accum} micro-steps x "
        f"{cfg.micro_batch_size} = global batch {cfg.batch_size}, device {device}, {'bf16 autocast' if use_bf16 else 'float32'}")

    policy = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 and not shard else model
    if cfg.compile:
        policy = torch.compile(policy)
    fpt, peak = plan.flops_per_token(model), plan.peak_flops(device)
    t_start, t_last, tokens_since = time.time(), time.time(), 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = data.global_batch(step, len(train_set), cfg.batch_size, cfg.seed)
        units = UNITS[cfg.objective](cfg, [train_set[i] for i in indices])  # examples or tokens in the global batch
        micro = [[train_set[i] for i in chunk] for chunk in data.micro_batches(indices, rank, world, cfg.micro_batch_size)]
        rt.batch = [train_set[i] for i in indices]  # BN's pool: the global batch, the same on every rank
        rt.step = step
        if bn and (short := negatives.bn_shortfall([e.continuation_ids for e in rt.batch], bn)):
            log(f"step {step + 1}: {short} BN columns left invalid (the global batch repeats examples or answers)")
        try:
            sums, tokens = train_step(cfg, policy, ref, micro, rt, step, units, world)
            loss = sums[0] / units
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss}")
        except FloatingPointError as e:
            last = checkpoints(cfg.out_dir)
            raise SystemExit(f"step {step + 1}: {e}; stopped before the update. "
                             f"Last good checkpoint: {last[-1] if last else 'none'} (continue with --resume)")
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens * world

        done = step + 1
        if done % cfg.log_interval == 0 or done in (1, cfg.steps):  # step 1: the starting point of the curves
            dt, t_last = time.time() - t_last, time.time()
            tok_s = tokens_since / dt
            tokens_since = 0
            eta = (time.time() - t_start) / (done - start) * (cfg.steps - done)
            diag = dict(zip(DIAGNOSTICS, (x / cfg.batch_size for x in sums[1:]))) if ref is not None else {}
            extra = (f" | acc {diag['reward_accuracy']:.2f} margin {diag['reward_margin']:.2f} | log pi truth "
                     f"{diag['logp_truth']:.2f} negatives {diag['logp_negatives']:.2f}") if diag else ""
            mfu = f" | mfu {100 * tok_s * fpt / (peak * world):.1f}%" if peak else ""
            log(f"step {done}/{cfg.steps} | loss {loss:.4f}{extra} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu} | eta {eta / 60:.1f} min")
            if master:
                append_metrics(cfg.out_dir, {"step": done, "loss": loss, "lr": lr, **diag})
        if (master or shard) and cfg.eval_interval and val_set and (done % cfg.eval_interval == 0 or done == cfg.steps):
            log(f"step {done}: held-out loss {heldout_loss(model, val_set, tok.pad_id, device, autocast):.4f}")
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < cfg.steps:
            log(f"saved {save(cfg, done, model, tok, optimizer, rt.ref_cache, rank)}")

    if master and ref is not None and val_set and not shard:  # sharded, generation would need every rank
        changed = changed_vs_reference(model, ref, tok, val_set, rt.autocast)
        log(f"held-out greedy outputs changed vs the reference: {changed:.3f} of {len(val_set)}")
        append_metrics(cfg.out_dir, {"step": cfg.steps, "changed_vs_ref": changed})
    save(cfg, cfg.steps, model, tok, optimizer, rt.ref_cache, rank)
    final_model = fsdp.gathered(model, optimizer)[0] if shard else model  # every rank takes part in the gather
    if master:
        save_dtype = start_dtype if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
        save_pretrained(final_model.to(save_dtype), final_dir, tok)  # the last use of the model: cast in place
        write_atomic(os.path.join(final_dir, "nanocpo.json"), json.dumps({"max_len": cfg.max_len}))
        log(f"saved {final_dir} ({str(save_dtype).removeprefix('torch.')})")
    barrier()
    return final_dir


def append_metrics(out_dir, record):
    """One line of out_dir/metrics.jsonl: the log line's numbers, for plots and tables (miniature.py)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def changed_vs_reference(model, ref, tok, examples, autocast):
    """The share of held-out prompts whose greedy continuation the run changed: 0 means it left the
    model's behaviour as it was, whatever its loss did. Up to the longest held-out answer's length."""
    n_new = max(len(e.continuation_ids) for e in examples)
    with autocast:
        gens = [decoding.greedy_continuations(m, tok, examples, n_new) for m in (unwrap(model).eval(), ref.eval())]
    return sum(cut_at_eos(a, tok.eos_id) != cut_at_eos(b, tok.eos_id) for a, b in zip(*gens)) / len(examples)

# ----------------------------------------------------------------------------- the embedded default

def run_pipeline(preset_path, flags):
    """`python train.py` with no arguments: the method in miniature. Stages run in order, each in
    out_dir/<stage>; a stage may start from an earlier one (init_from="ref"). A finished stage (its
    final/ folder exists) is skipped and an interrupted one resumes, so rerunning continues the pipeline.
    Then every stage's model is scored on held-out prompts with greedy decoding."""
    base, stages = load_preset(preset_path)
    finals = {}
    for name, overrides in stages.items():
        cfg = Config(**{"resume": True, **base, **overrides, **flags})
        cfg = replace(cfg, out_dir=os.path.join(cfg.out_dir, name), init_from=finals.get(cfg.init_from, cfg.init_from))
        final = os.path.join(cfg.out_dir, "final")
        if os.path.isdir(final):
            print(f"=== stage {name}: already trained, {final} (delete it to train again)")
            finals[name] = final
            continue
        print(f"=== stage {name}: {cfg.objective} from {cfg.init_from}, {cfg.steps} steps, into {cfg.out_dir}")
        finals[name] = train(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    cfg = Config(**{**base, **flags})
    rows = []
    for name, path in finals.items():
        model, tok = load(path)
        test_set = data.load_task(cfg.task, "test", tok, cfg.max_len, n=cfg.n_val, seed=cfg.seed)[:cfg.n_val]
        rows.append((name, decoding.task_scores(model.eval(), tok, test_set, cfg.task)))
    print(f"\nheld-out {cfg.task} prompts: {len(test_set)}, greedy decoding")
    keys = list(rows[0][1])
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, scores in rows:
        print(f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in keys) + " |")


def main(argv):
    preset, flags = parse_args(argv, __doc__)
    path = preset or os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "default.py")
    base, stages = load_preset(path)
    if flags.get("plan"):
        cfg = Config(**{**base, **flags})
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        plan.check(cfg, cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", 1)), device)
    elif preset is None and flags:  # flags alone: exactly one run, never the default's stages (see ONE_RUN)
        train(Config(**flags))
    elif stages:
        run_pipeline(path, flags)
    else:
        train(Config(**{**base, **flags}))
    if dist.is_initialized():
        # FSDP's hooks tie the sharded modules in reference cycles that only the garbage collector frees: free
        # them while their process group still exists (freed at interpreter exit, gloo ranks sometimes abort)
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
