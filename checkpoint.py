"""
Checkpoints of a training run (train.py), so that a killed run resumes bit-exactly with --resume:
the weights in HF format (hf.save_pretrained, so a checkpoint is also a model folder), the optimizer, the
step (which fixes the data position, data.global_batch being a pure function of it), and every rank's RNG
state and reference log-prob cache.

    out_dir/ckpt-0000100/  model/ (config.json, model.safetensors, tokenizer)  trainer.pt  rank0.pt  rank1.pt ...
"""
import os
import random
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist

from hf import load, save_pretrained


def barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def save_checkpoint(cfg, step, model, tok, optimizer, ref_cache, rank):
    """Weights in HF format, optimizer, step (the data position), every rank's RNG and reference cache.
    Written into ckpt-N.tmp and renamed only when complete, so a kill mid-write leaves the last one intact."""
    final = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, os.path.join(tmp, "model"), tok)
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg)}, os.path.join(tmp, "trainer.pt"))
    barrier()
    torch.save({"rng": rng_state(), "ref_cache": ref_cache}, os.path.join(tmp, f"rank{rank}.pt"))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(cfg.out_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def restore_checkpoint(path, model, optimizer, rank):
    """The inverse of save_checkpoint; returns (step, ref_cache). Resuming on more ranks than saved it
    works, but the new ranks start with fresh RNG and an empty cache, so it is no longer bit-exact."""
    weights, _ = load(os.path.join(path, "model"))
    model.load_state_dict(weights.state_dict())
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    if not os.path.exists(os.path.join(path, f"rank{rank}.pt")):
        print(f"rank {rank}: {path} has no rank{rank}.pt (saved by fewer ranks): fresh RNG and reference cache")
        return trainer["step"], {}
    mine = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=True)
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    random.setstate(mine["rng"]["python"])
    return trainer["step"], mine["ref_cache"]
