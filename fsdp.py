r"""
Sharded data parallel training for train.py --fsdp: PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard),
not a home-made scheme. Each rank keeps 1/W of the float32 weights, gradients and AdamW state; a block's
weights are all-gathered (in bf16 on CUDA) just before it runs and freed after; gradients are
reduce-scattered in float32. pi_ref is sharded the same way (it has no gradients and no optimizer).

    torchrun --standalone --nproc_per_node=8 train.py config/dolly_llama3b_mixnr.py \
        --fsdp --activation_checkpointing

Checkpoints: the sharded state is gathered to rank 0 (CPU) and written in train.py's usual layout, so
ckpt-N/model and final/ stay plain HF folders that transformers (or one GPU) loads, and resuming reads the
same files and re-shards them. We chose the gather over torch.distributed.checkpoint's sharded files
because the run's own checkpoints are then models too, and for our <= 3B models rank 0's CPU holds the
gathered 12 bytes/parameter (weights and AdamW, ~41 GB for OpenLlama-3B) easily; beyond that, DCP's
per-rank files would be the way.
"""
from contextlib import nullcontext

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from checkpoint import restore_checkpoint, save_checkpoint
from model import Transformer

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on CPU, on rank 0 only


def mixed_precision(device):
    """bf16 compute with float32 gradient reduction on CUDA; float32 throughout on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model, device):
    """One FSDP unit per Transformer block, then the root (embeddings, final norm, lm_head). The root's
    weights stay gathered after the forward (FSDP2 does so for the root), which train.sequence_logps relies
    on: it reads lm_head.weight outside the forward to score from the hidden states."""
    mp = mixed_precision(device)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model):
    """Whether fully_shard wrapped this model (its forward then all-gathers, a collective)."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def grad_sync(policy, sync):
    """A context for one micro-step's forward and backward: gradients are reduced across ranks only when
    sync (the last micro-step). DDP must know before the forward (no_sync); FSDP2 before the backward."""
    policy = getattr(policy, "_orig_mod", policy)  # torch.compile's wrapper
    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(sync)
        return nullcontext()
    return policy.no_sync() if not sync and hasattr(policy, "no_sync") else nullcontext()


class _Gathered:
    """An optimizer stand-in holding a gathered state dict: what checkpoint.save_checkpoint writes."""
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def gathered(model, optimizer):
    """Every rank calls this (it all-gathers). Rank 0 gets (a plain float32 Transformer on the CPU, the
    optimizer's full state keyed by parameter name); the others (None, None)."""
    weights, optim = get_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not weights:
        return None, None
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(weights, assign=True)
    return plain, _Gathered(optim)


def save(cfg, step, model, tok, optimizer, ref_cache, rank):
    """checkpoint.save_checkpoint for a sharded model: the same files, gathered to rank 0."""
    plain, optim = gathered(model, optimizer)
    return save_checkpoint(cfg, step, plain, tok, optim, ref_cache, rank)


class _Loaded:
    """What checkpoint.restore_checkpoint loads a state dict into, to be sharded afterwards."""
    def load_state_dict(self, state):
        self.state = state


def restore(path, model, optimizer, rank):
    """checkpoint.restore_checkpoint for a sharded model: every rank reads the full state and keeps its shard.
    Returns (step, ref_cache). Resume with the world size and --fsdp of the run that saved it for
    bit-exactness."""
    weights, optim = _Loaded(), _Loaded()
    step, ref_cache = restore_checkpoint(path, weights, optim, rank)
    set_state_dict(model, optimizer, model_state_dict=weights.state, optim_state_dict=optim.state,
                   options=StateDictOptions(full_state_dict=True))
    return step, ref_cache
