"""Runs presets of config/ exactly as shipped, one optimisation step each, on tiny stand-ins
(tests/test_presets.py). Several presets per process, so that one torchrun launch covers all of them:
    torchrun --standalone --nproc_per_node=2 tests/preset_driver.py STAND_INS OUT name [name ...]

Swapped, and nothing else: init_from (a tiny model of the preset's family: gpt2 or llama, 1 layer, width
16, the byte tokenizer), the data paths (task, an_cache, dpo_rejected: tiny files of the same format),
max_len (64), steps (1) and out_dir. Micro-batch size, batch 64, negatives, ranking, objective, lr,
beta... are the preset's."""
import os
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

SWAPPED = ("init_from", "task", "an_cache", "dpo_rejected", "max_len", "steps", "out_dir")


def shipped(name):
    config, stages = train.load_preset(os.path.join(ROOT, "config", name + ".py"))
    assert not stages, f"{name}: a paper preset is one run"
    return train.Config(**config)


def as_shipped(name, stand_ins, out_dir):
    """The preset with only SWAPPED changed, pointing at the stand-ins that tests/test_presets.py writes."""
    cfg = shipped(name)
    family = "gpt2" if "gpt2" in name else "llama"
    task = f"dolly:{stand_ins}/dolly.jsonl" if cfg.task == "dolly" else f"wiki:{stand_ins}/wiki.jsonl"
    an_cache = os.path.join(stand_ins, f"an_{family}") if cfg.an_cache else ""
    dpo_rejected = os.path.join(stand_ins, "rejected.jsonl") if cfg.dpo_rejected else ""
    return replace(cfg, init_from=os.path.join(stand_ins, family), task=task, max_len=64, steps=1,
                   out_dir=out_dir, an_cache=an_cache, dpo_rejected=dpo_rejected)


if __name__ == "__main__":
    stand_ins, out = sys.argv[1], sys.argv[2]
    for name in sys.argv[3:]:
        print(f"=== {name}", flush=True)
        train.train(as_shipped(name, stand_ins, os.path.join(out, name)))
    train.close_distributed()  # as train.py's main ends: FSDP's modules freed before the process group
