"""
A training run's checkpoints, so that a killed run (train.py) resumes bit-exactly with --resume (refused
when a setting that changes the math differs: settings.config_differences): the weights in HF format
(hf.save_pretrained, so a checkpoint is also a model folder), the optimizer, the step (which fixes the
data position, data.global_batch being a pure function of it), and every rank's RNG state and reference
log-prob cache.

    out_dir/ckpt-0000100/  model/ (config.json, model.safetensors, tokenizer)
                           trainer.pt  rank0.pt  rank1.pt ...
"""
import os
import random
import re
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist

from hf import load, save_pretrained
from settings import SAFE_TO_CHANGE, config_differences


def barrier():
    if dist.is_initialized():
        dist.barrier()


CHECKPOINT_NAME = re.compile(r"ckpt-(\d{7,})")  # exactly what save_checkpoint writes: ckpt-0000100


def checkpoints(out_dir):
    """The trainer's checkpoint folders in out_dir, oldest first. Only names of the exact pattern count: a
    user's ckpt-0000001-mybackup/ or ckpt-notes.txt is neither resumed from nor deleted by rotation."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m[1]), d) for d in os.listdir(out_dir) if (m := CHECKPOINT_NAME.fullmatch(d))
             and os.path.isdir(os.path.join(out_dir, d))]
    return [os.path.join(out_dir, d) for _, d in sorted(found)]


def rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def save_checkpoint(cfg, step, model, tok, optimizer, ref_cache, rank):
    """Weights in HF format, optimizer, step (the data position), every rank's RNG and reference cache.
    Written into ckpt-N.tmp and renamed only when complete, so a kill mid-write leaves the last one intact."""
    final = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, os.path.join(tmp, "model"), tok)
        trainer = {"optimizer": optimizer.state_dict(), "step": step, "config": asdict(cfg)}
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
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


# ----------------------------------------------------------------------------- settings
def checkpoint_config(path):
    """(step, config dict) saved in a checkpoint's trainer.pt; ValueError naming the file if it won't load."""
    trainer = load_file(os.path.join(path, "trainer.pt"))
    return trainer["step"], trainer.get("config", {})


def load_file(path):
    """torch.load(weights_only) with every failure (missing, torn zip, bad pickle) a ValueError naming
    the file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def resume_newest(cfg, model, optimizer, rank, log=print, restore=None):
    """--resume: restore the newest checkpoint in cfg.out_dir that loads (a bad one is named, and the one
    before it tried) after checking that cfg changes nothing but SAFE_TO_CHANGE -> (step, ref_cache), or
    (0, {}) when there is none. SystemExit listing the differences, or every bad file when none loads."""
    bad = []
    for path in reversed(checkpoints(cfg.out_dir)):
        try:
            step, old = checkpoint_config(path)
            diffs = config_differences(old, asdict(cfg), step)
            if diffs:
                safe = ", ".join(sorted(SAFE_TO_CHANGE))
                raise SystemExit(f"--resume from {path}: the checkpoint was trained with other settings, "
                                 "and these would change the run's math:\n  " + "\n  ".join(diffs)
                                 + f"\nOnly {safe} may change (use a new --out_dir for a new run)")
            # fsdp.restore under --fsdp
            step, ref_cache = (restore or restore_checkpoint)(path, model, optimizer, rank)
            loaded = True
        except ValueError as e:
            log(f"{path} is damaged ({e}); trying the checkpoint before it")
            bad.append(str(e))
            loaded = False
        # one rank failed: all move on to the one before (a later restore overwrites a partial one)
        if not all_ranks(loaded, next(model.parameters()).device):
            continue
        if path != checkpoints(cfg.out_dir)[-1]:
            log(f"fell back to {path}, the newest checkpoint that loads")
        return step, ref_cache
    if checkpoints(cfg.out_dir):
        raise SystemExit(f"--resume: no checkpoint in {cfg.out_dir} loads:\n  " + "\n  ".join(bad))
    return 0, {}


def all_ranks(flag, device):
    """True iff flag is True on every rank: ranks resume from the same checkpoint, or none does."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def restore_checkpoint(path, model, optimizer, rank):
    """The inverse of save_checkpoint; returns (step, ref_cache). Resuming on more ranks than saved it
    works, but the new ranks start with fresh RNG and an empty cache, so it is no longer bit-exact."""
    weights, _ = load(os.path.join(path, "model"))
    model.load_state_dict(weights.state_dict())
    trainer = load_file(os.path.join(path, "trainer.pt"))
    optimizer.load_state_dict(trainer["optimizer"])
    if not os.path.exists(os.path.join(path, f"rank{rank}.pt")):
        print(f"rank {rank}: {path} has no rank{rank}.pt (saved by fewer ranks): "
              "fresh RNG and reference cache")
        return trainer["step"], {}
    mine = load_file(os.path.join(path, f"rank{rank}.pt"))
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    random.setstate(mine["rng"]["python"])
    return trainer["step"], mine["ref_cache"]
