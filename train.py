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

One CPO step, in the order the code calls it:
  train                               the loop: this step's global batch (data.global_batch), lr, clip, AdamW
  train_step                          this rank's micro-batches of the global batch; backward on each
  cpo_objective                       one micro-batch of B examples:
    negatives.build_cpo_batch         each ground truth and its K-1 negatives: (B, K, T) ids and masks
    model.Transformer.forward         the final hidden states of the B*K sequences (group_logps)
    cpo.sequence_logprobs_from_hidden log pi(y|x) of each, without the (N, T, V) logits; pi_ref's likewise
    cpo.cpo_loss                      eq. (1), or eq. (2) with --ranked: per-example losses and rewards
scoring.py holds the two optimisations beside this plain path: the shared-prompt forward (--shared_prompt)
and the reference cache.
"""
import copy
import gc
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
import scoring
from checkpoint import all_ranks, barrier, checkpoints, restore_checkpoint, resume_newest, save_checkpoint
from common import cut_at_eos, write_atomic
from hf import load, save_pretrained
from settings import Config, load_preset, parse_args, validate_config
from model import Transformer, resolve_device
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
    ref_cache: scoring.ReferenceCache | None = field(default_factory=scoring.ReferenceCache)  # None: no cache
    an_cache: dict | None = None  # example id -> AN negatives (negatives.load_an_cache)
    rejected: dict | None = None  # example id -> DPO's rejected Example (data.load_rejected)
    batch: list = field(default_factory=list)  # this step's whole global batch (Examples): BN's pool
    step: int = 0  # the optimisation step being computed: it seeds the step's negatives (and PSS's draws)
    micro: int = 0  # this micro-batch's index in the global batch: PSS draws a stream per micro-batch
    shared_prompt: bool = True  # cpo/dpo: score (B, K, T) groups with the shared-prompt forward


# ----------------------------------------------------------------------------- distributed

def setup(cfg):
    """Returns (rank, world, device). torchrun sets RANK/WORLD_SIZE; NCCL on CUDA, gloo on CPU."""
    device = resolve_device(cfg.device)
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
    torch.manual_seed(cfg.seed)  # the initial weights come from torch's global stream
    return Transformer(plan.scratch_model_config(cfg)), byte_tokenizer(), torch.float32


def frozen_copy(model, dtype=torch.float32):
    """pi_ref: the starting weights, frozen. Never trained, never wrapped in DDP."""
    ref = copy.deepcopy(model).to(dtype).eval()
    ref.requires_grad_(False)
    return ref


def unwrap(model):
    """The Transformer inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


# ----------------------------------------------------------------------------- one step of each objective
# The plain path, as the paper defines the step. scoring.py holds the two optimisations that compute the same
# numbers for less: the shared-prompt forward (--shared_prompt) and the reference cache (rt.ref_cache).
# Each objective returns (its loss summed over this micro-batch's units, metrics); the loop divides by the
# global batch's units (examples for cpo/dpo, continuation tokens for mle/pss), so the gradient is the same
# for any split into ranks and micro-steps.

def sequence_logps(model, ids, mask):
    """log pi(y|x) of (N, T) sequences -> (N,): the SUM over continuation tokens (the paper's reward uses the
    sum), straight from the final hidden states, so the (N, T, V) logits never exist."""
    hidden = model(ids[:, :-1], return_hidden=True)  # (N, T-1, C): hidden[:, t] predicts ids[:, t + 1]
    return cpo.sequence_logprobs_from_hidden(hidden, unwrap(model).lm_head.weight, ids[:, 1:], mask[:, 1:])


def group_logps(model, ids, mask, rt):
    """log pi(y|x) of (B, K, T) groups, the K of an example sharing its prompt -> (B, K). ids and mask come
    on the CPU and go to rt.device. With --shared_prompt, each prompt runs once
    (scoring.shared_prompt_logps)."""
    B, K, T = ids.shape
    if rt.shared_prompt and not mask[:, :, 0].any():  # every group has a prompt to share
        return scoring.shared_prompt_logps(model, ids, mask, rt.device)
    ids, mask = ids.view(B * K, T).to(rt.device), mask.view(B * K, T).to(rt.device)
    return sequence_logps(model, ids, mask).view(B, K)


@torch.no_grad()
def reference_logps(ref, ids, mask, cacheable, rt):
    """log pi_ref(y|x) of (B, K, T) groups -> (B, K). Without a cache (rt.ref_cache None), every group is
    scored; with one, only the groups holding a sequence it cannot answer (scoring.ReferenceCache)."""
    if rt.ref_cache is None:
        return group_logps(ref, ids, mask, rt).float()
    keys, rows = rt.ref_cache.lookup(ids, mask, cacheable)
    run_forward = bool(rows)
    if fsdp.is_sharded(ref):
        # A sharded pi_ref all-gathers its weights inside the forward, a collective: every rank runs it or
        # none does, whatever its own cache holds (one rank skipping it is a gloo abort, a NCCL hang).
        run_forward = not all_ranks(not rows, rt.device)
    scores = None
    if run_forward:
        scores = group_logps(ref, ids[rows or [0]], mask[rows or [0]], rt).float()  # [0]: only to join in
    return rt.ref_cache.fill(keys, cacheable, rows, scores if rows else None, rt.device)


def negatives_generator(cfg, step):
    """The stream a step's negatives are drawn from. The paper's loss is an expectation over negatives, so TN
    cuts, MN positions and draws and BN picks are drawn afresh each step, from (seed, step) and, inside
    build_cpo_batch, each example's id: the same for any world size and micro-batch split, and on --resume.
    --fixed_negatives: one draw per example for the whole run (the same negatives every epoch)."""
    if cfg.fixed_negatives:
        return negatives.make_generator(cfg.seed)
    return negatives.make_generator(cfg.seed, "step", step)


def check_finite(policy_logps):
    if not torch.isfinite(policy_logps).all():  # the model diverged; the loop stops the run cleanly
        raise FloatingPointError("the policy's log-probs are NaN or inf")


def cpo_batch(cfg, policy, ref, examples, rt):
    """This micro-batch's ground truths (column 0) and negatives -> (B, K, T) ids and continuation masks,
    (B, K) valid and cacheable, on the CPU. BN draws from the whole global batch rt.batch, MN from pi_theta
    (the paper's §3; --mn_model=ref: from pi_ref)."""
    return negatives.build_cpo_batch(
        examples, cfg.negatives, ref, pad_id=rt.pad_id, eos_id=rt.eos_id,
        generator=negatives_generator(cfg, rt.step), an_cache=rt.an_cache, ranked=cfg.ranked,
        allow_fewer=True, bn_pool=[e.continuation_ids for e in rt.batch or examples],
        mn_model=unwrap(policy) if cfg.mn_model == "policy" else ref, fixed_negatives=cfg.fixed_negatives)


def cpo_objective(cfg, policy, ref, examples, rt):
    """Eq. (1), or eq. (2) with cfg.ranked: each ground truth against its K-1 synthetic negatives."""
    ids, mask, valid, cacheable = cpo_batch(cfg, policy, ref, examples, rt)  # (B, K, T) x 2, (B, K) x 2
    policy_logps = group_logps(policy, ids, mask, rt)  # (B, K) log pi_theta(y|x)
    ref_logps = reference_logps(ref, ids, mask, cacheable, rt)  # (B, K) log pi_ref(y|x)
    check_finite(policy_logps)
    # An example all of whose negatives equal its ground truth (a good model's AN or MN samples of a short
    # answer can) has nothing to contrast: it sits out this step, adding zero to the summed loss.
    has_negative = valid[:, 1:].any(1)  # (B,), on the CPU: no sync
    if not has_negative.any():
        return 0.0 * policy_logps.sum(), {"tokens": ids.numel()}
    rows, valid = has_negative.to(rt.device), valid[has_negative].to(rt.device)
    policy_logps, ref_logps = policy_logps[rows], ref_logps[rows]  # (B', K)
    losses, rewards = cpo.cpo_loss(policy_logps, ref_logps, beta=cfg.beta, ranked=cfg.ranked, valid=valid)
    loss = losses.sum()
    if cfg.mle_weight:
        # the paper's mixed objective alpha * L_MLE + L_CPO per example, L_MLE the mean token NLL of this
        # micro-batch's ground truths (cpo.mle_loss's definition)
        truth_tokens = mask[has_negative, 0].sum()
        mle = -policy_logps[:, 0].sum() / truth_tokens.to(rt.device)
        loss = loss + cfg.mle_weight * mle * len(losses)
    metrics = {**cpo.reward_metrics(rewards, valid), **logp_diagnostics(policy_logps, valid)}
    return loss, {**metrics, "tokens": ids.numel()}


def logp_diagnostics(policy_logps, valid=None):
    """Mean log pi_theta of the ground truths (column 0) and of the valid negatives (all, without `valid`): if
    both fall while the margin grows, the loss is being won by pushing everything down (DPO's known
    failure)."""
    lp = policy_logps.detach()  # (B, K)
    if valid is None:
        return {"logp_truth": lp[:, 0].mean(), "logp_negatives": lp[:, 1:].mean()}
    neg = valid[:, 1:]
    return {"logp_truth": lp[:, 0].mean(), "logp_negatives": (lp[:, 1:] * neg).sum() / neg.sum().clamp(min=1)}


def mle_objective(cfg, policy, ref, examples, rt):
    """Next-token NLL of the continuation tokens."""
    ids, mask = data.collate(examples, rt.pad_id)  # (B, T)
    return -sequence_logps(policy, ids.to(rt.device), mask.to(rt.device)).sum(), {"tokens": ids.numel()}


def dpo_objective(cfg, policy, ref, examples, rt):
    """DPO's Bradley-Terry loss: the ground truth against one rejected response per prompt."""
    B = len(examples)
    rejected = [rt.rejected[e.id] for e in examples]
    ids, mask = data.collate([e for pair in zip(examples, rejected) for e in pair], rt.pad_id)  # (2B, T)
    ids, mask = ids.view(B, 2, -1), mask.view(B, 2, -1)  # (B, 2, T): chosen, rejected
    policy_logps = group_logps(policy, ids, mask, rt)  # (B, 2)
    ref_logps = reference_logps(ref, ids, mask, torch.ones(B, 2, dtype=torch.bool), rt)  # both come back
    check_finite(policy_logps)
    losses, chosen, rejected = cpo.dpo_loss(policy_logps[:, 0], policy_logps[:, 1], ref_logps[:, 0],
                                            ref_logps[:, 1], cfg.beta)
    metrics = {**cpo.reward_metrics(torch.stack([chosen, rejected], 1)), **logp_diagnostics(policy_logps)}
    return losses.sum(), {**metrics, "tokens": ids.numel()}


def pss_objective(cfg, policy, ref, examples, rt):
    """Parallel scheduled sampling (Duckworth et al. 2019, "Parallel Scheduled Sampling"): a teacher-forced
    pass samples a token at every position; each continuation input token is replaced by its sample with
    probability p; a second pass on the mixed inputs is trained against the ground-truth targets."""
    device, step = rt.device, rt.step
    ids, mask = data.collate(examples, rt.pad_id)
    ids = ids.repeat(cfg.pss_samples, 1).to(device)  # (S*B, T)
    mask = mask.repeat(cfg.pss_samples, 1).to(device)
    p = cfg.pss_p * min(1.0, (step + 1) / cfg.pss_warmup_steps) if cfg.pss_warmup_steps else cfg.pss_p
    # a stream per micro-batch
    seed = int(np.random.SeedSequence([cfg.seed, step, rt.micro]).generate_state(1)[0])
    gen = negatives.make_generator(seed, device=device)
    with torch.no_grad():
        logits = unwrap(policy)(ids[:, :-1]).float()  # (N, T-1, V): logits[:, t] predicts token t+1
        probs = logits.softmax(-1).flatten(0, 1)
        samples = torch.multinomial(probs, 1, generator=gen).view(ids.shape[0], -1)  # (N, T-1)
    draw = torch.rand(samples.shape, generator=gen, device=device) < p
    replace = mask[:, 1:] & draw  # continuation positions only
    mixed = torch.cat([ids[:, :1], torch.where(replace, samples, ids[:, 1:])], dim=1)
    hidden = policy(mixed[:, :-1], return_hidden=True)  # (N, T-1, C): inputs from the mix...
    weight = unwrap(policy).lm_head.weight
    logps = cpo.sequence_logprobs_from_hidden(hidden, weight, ids[:, 1:], mask[:, 1:])  # ...targets the truth
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

def flops_per_token(model):
    """Training FLOPs per token, 6N plus attention (PaLM appendix B): the MFU of the log line."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * c.n_layer * c.n_embd * c.max_seq_len


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device):
    """The GPU's dense bf16 peak, for the MFU of the log line; None where unknown (and on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


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
            rt.micro = rank * accum + m
            loss_sum, metrics = OBJECTIVES[cfg.objective](cfg, policy, ref, examples, rt)
        # DDP averages over ranks: world / units makes it the global batch's mean
        (loss_sum * world / units).backward()
        diagnostics = [len(examples) * metrics.get(k, zero) for k in DIAGNOSTICS]  # means -> sums
        sums += torch.stack([loss_sum.detach().float()] + diagnostics)
        tokens += metrics["tokens"]
    return all_sum(sums).tolist(), tokens


def log_line(done, cfg, loss, lr, sums, tok_s, eta, mfu, contrastive):
    """The step's log line, and its numbers for metrics.jsonl. contrastive (cpo/dpo): the diagnostics too."""
    diag = dict(zip(DIAGNOSTICS, (x / cfg.batch_size for x in sums[1:]))) if contrastive else {}
    line = f"step {done}/{cfg.steps} | loss {loss:.4f}"
    if diag:
        line += (f" | acc {diag['reward_accuracy']:.2f} margin {diag['reward_margin']:.2f}"
                 f" | log pi truth {diag['logp_truth']:.2f} negatives {diag['logp_negatives']:.2f}")
    line += f" | lr {lr:.2e} | {tok_s:,.0f} tok/s"
    if mfu is not None:
        line += f" | mfu {100 * mfu:.1f}%"
    return line + f" | eta {eta / 60:.1f} min", {"step": done, "loss": loss, "lr": lr, **diag}


def load_data(cfg, tok):
    """(training examples, held-out examples), refusing a run that has nothing to train on, or a BN count
    that no batch of this data could satisfy."""
    train_set = data.load_task(cfg.task, "train", tok, cfg.max_len, n=cfg.n_train or None, seed=cfg.seed,
                               val_fraction=cfg.val_fraction)
    if not train_set:
        raise SystemExit(f"task {cfg.task!r}: no training examples (an empty file, or every example "
                         f"dropped: see the counts above)")
    negatives.check_bn_satisfiable(bn_count(cfg), [e.continuation_ids for e in train_set], cfg.batch_size)
    return train_set, heldout_set(cfg, tok)


def bn_count(cfg):
    """BN negatives per example of a CPO run (0 otherwise)."""
    return dict(negatives.parse_spec(cfg.negatives)).get("bn", 0) if cfg.objective == "cpo" else 0


def train(cfg):
    """One run: cfg.steps optimisation steps of cfg.objective from cfg.init_from. Returns the final model's
    folder."""
    validate_config(cfg)
    rank, world, device = setup(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    accum, rem = divmod(cfg.batch_size, cfg.micro_batch_size * world)
    if rem or accum == 0:
        raise SystemExit(f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size "
                         f"{cfg.micro_batch_size} x world size {world}")
    if cfg.objective not in OBJECTIVES:
        raise SystemExit(f"unknown objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")

    # a preset's --fsdp run in one process (a test, a stand-in model) has nothing to shard
    shard = cfg.fsdp and world > 1
    if cfg.fsdp and not shard:
        log("--fsdp: one process, nothing to shard; training unsharded")
    plan.check(cfg, world, device, log)  # before any weights are read: stops here if the run cannot fit
    model, tok, start_dtype = starting_model(cfg)
    model.checkpoint_blocks = cfg.activation_checkpointing
    ref = None
    if cfg.objective in ("cpo", "dpo"):
        ref_dtype = torch.bfloat16 if cfg.ref_dtype == "bfloat16" and device.type == "cuda" else torch.float32
        ref = frozen_copy(model, ref_dtype)
    train_set, val_set = load_data(cfg, tok)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    for net in (model, ref):
        if net is not None:
            net.to(device)
            if shard:  # before the optimizer, which must see the sharded parameters
                fsdp.shard(net, device)
    save, restore = (fsdp.save, fsdp.restore) if shard else (save_checkpoint, restore_checkpoint)
    optimizer = make_optimizer(model, cfg, device)
    rt = Runtime(device=device, rank=rank, autocast=autocast, pad_id=tok.pad_id, eos_id=tok.eos_id,
                 shared_prompt=cfg.shared_prompt)
    if cfg.an_cache:
        rt.an_cache = negatives.load_an_cache(cfg.an_cache)
    if cfg.objective == "dpo":
        rt.rejected = data.load_rejected(cfg.dpo_rejected, train_set, tok, cfg.max_len)

    start = 0
    if cfg.resume and checkpoints(cfg.out_dir):
        start, entries = resume_newest(cfg, model, optimizer, rank, log, restore)
        rt.ref_cache = scoring.ReferenceCache(entries)
        log(f"resumed from {cfg.out_dir} at step {start}")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(asdict(cfg), indent=2))
    log(f"config: {json.dumps(asdict(cfg))}")
    log(f"{cfg.objective} on {cfg.task}: {len(train_set)} training examples, {world} rank(s) x {accum} "
        f"micro-steps x {cfg.micro_batch_size} = global batch {cfg.batch_size}, device {device}, "
        f"{'bf16 autocast' if use_bf16 else 'float32'}")

    policy = model
    if world > 1 and not shard:
        policy = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        policy = torch.compile(policy)
    fpt, peak, bn = flops_per_token(model), peak_flops(device), bn_count(cfg)
    t_start, t_last, tokens_since = time.time(), time.time(), 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = data.global_batch(step, len(train_set), cfg.batch_size, cfg.seed)
        rt.batch = [train_set[i] for i in indices]  # BN's pool: the global batch, the same on every rank
        rt.step = step
        units = UNITS[cfg.objective](cfg, rt.batch)  # examples or tokens in the global batch
        chunks = data.micro_batches(indices, rank, world, cfg.micro_batch_size)
        micro = [[train_set[i] for i in chunk] for chunk in chunks]
        short = bn and negatives.bn_shortfall([e.continuation_ids for e in rt.batch], bn)
        if short:
            log(f"step {step + 1}: {short} BN columns left invalid "
                f"(the global batch repeats examples or answers)")
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
            tok_s, tokens_since = tokens_since / dt, 0
            eta = (time.time() - t_start) / (done - start) * (cfg.steps - done)
            mfu = tok_s * fpt / (peak * world) if peak else None
            line, record = log_line(done, cfg, loss, lr, sums, tok_s, eta, mfu, contrastive=ref is not None)
            log(line)
            if master:
                append_metrics(cfg.out_dir, record)
        evaluate_now = cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.steps)
        if (master or shard) and evaluate_now and val_set:
            heldout = heldout_loss(model, val_set, tok.pad_id, device, autocast)
            log(f"step {done}: held-out loss {heldout:.4f}")
        if cfg.ckpt_interval and done % cfg.ckpt_interval == 0 and done < cfg.steps:
            log(f"saved {save(cfg, done, model, tok, optimizer, rt.ref_cache.entries, rank)}")

    if master and ref is not None and val_set and not shard:  # sharded, generation would need every rank
        changed = changed_vs_reference(model, ref, tok, val_set, rt.autocast)
        log(f"held-out greedy outputs changed vs the reference: {changed:.3f} of {len(val_set)}")
        append_metrics(cfg.out_dir, {"step": cfg.steps, "changed_vs_ref": changed})
    save(cfg, cfg.steps, model, tok, optimizer, rt.ref_cache.entries, rank)
    return save_final(cfg, model, optimizer, tok, start_dtype, shard, master, log)


def save_final(cfg, model, optimizer, tok, start_dtype, shard, master, log):
    """out_dir/final: the model in HF format, in the starting checkpoint's dtype (or --save_dtype), with the
    training max_len in nanocpo.json. Every rank calls it (a sharded model is gathered first)."""
    final_dir = os.path.join(cfg.out_dir, "final")
    final_model = fsdp.gathered(model, optimizer)[0] if shard else model  # every rank joins the gather
    if master:
        save_dtype = start_dtype if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
        save_pretrained(final_model.to(save_dtype), final_dir, tok)  # its last use: cast in place
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
        nets = (unwrap(model).eval(), ref.eval())
        gens = [decoding.greedy_continuations(net, tok, examples, n_new) for net in nets]
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
        cfg = replace(cfg, out_dir=os.path.join(cfg.out_dir, name),
                      init_from=finals.get(cfg.init_from, cfg.init_from))
        final = os.path.join(cfg.out_dir, "final")
        if os.path.isdir(final):
            print(f"=== stage {name}: already trained, {final} (delete it to train again)")
            finals[name] = final
            continue
        print(f"=== stage {name}: {cfg.objective} from {cfg.init_from}, {cfg.steps} steps, "
              f"into {cfg.out_dir}")
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
        device = torch.device(resolve_device(cfg.device))
        plan.check(cfg, cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", 1)), device)
    elif preset is None and flags:  # flags alone: exactly one run, never the default's stages (see ONE_RUN)
        train(Config(**flags))
    elif stages:
        run_pipeline(path, flags)
    else:
        train(Config(**{**base, **flags}))
    close_distributed()


def close_distributed():
    """The end of a torchrun process. FSDP's hooks tie the sharded modules in reference cycles that only the
    garbage collector frees: free them while their process group still exists (freed at interpreter exit,
    gloo ranks sometimes abort with "terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
