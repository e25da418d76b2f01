"""
A run's settings: the Config dataclass (every field a flag, with its help text), presets (config/*.py files
that set some fields), the command line that puts them together (defaults < preset < --key=value flags), and
their checks: validate_config, and what --resume may change (SAFE_TO_CHANGE, config_differences).
train.py reads it; `python train.py --help` prints it.
"""
import argparse
import dataclasses
import os
import re
import runpy
import sys
from dataclasses import dataclass, field

# Settings a resumed run may change: they decide how long it runs, what it prints and where, never what a
# step computes. Anything else (objective, negatives, seed, batch sizes, lr, schedule, model, data) would
# silently turn the rest of the run into a different experiment.
SAFE_TO_CHANGE = {"steps", "log_interval", "eval_interval", "ckpt_interval", "keep_last", "out_dir", "resume",
                  "n_val", "device",
                  # these five change memory or speed, not the math
                  "compile", "activation_checkpointing", "shared_prompt", "plan", "plan_world_size",
                  "plan_gpu_gb"}


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model and data
    init_from: str = opt("scratch", "starting weights: an HF folder, a hub name, or 'scratch' "
                                    "(a new GPT-2 with the byte tokenizer)")
    n_layer: int = opt(4, "scratch model: layers")
    n_head: int = opt(4, "scratch model: attention heads")
    n_embd: int = opt(128, "scratch model: width")
    task: str = opt("synthetic", "synthetic | synthetic:long (answers of ~16-80 letters) | dolly "
                                 "| dolly:<path-or-url> | wiki:<path-or-url> | jsonl:<path-or-url>")
    max_len: int = opt(64, "tokens per sequence, prompt + continuation "
                           "(longer prompts are cut from the left)")
    n_train: int = opt(0, "training examples to use "
                          "(0: all; the synthetic task generates this many, default 20000)")
    n_val: int = opt(128, "held-out examples for the held-out loss and the final evaluation")
    val_fraction: float = opt(0.0, "jsonl: tasks: the fraction of your rows held out (0: train on every "
                                   "row, no held-out loss; dolly and wiki keep the paper's split)")
    val_task: str = opt("", "held-out examples from this task instead of --task's test split "
                            "(a jsonl: file: all its rows)")
    # objective
    objective: str = opt("mle", "mle | cpo | dpo | pss")
    negatives: str = opt("bn:3,mn:5,tn:3", "cpo: the negatives per example, "
                                           "e.g. an:11 or bn:3,mn:5,tn:3 (the paper's MixN)")
    mn_model: str = opt("policy", "cpo: MN samples from 'policy' (pi_theta, the paper's §3: the current "
                                  "weights, no grad; their log pi_ref is computed every step, never "
                                  "cached) or 'ref' (pi_ref, not the paper's; with --fixed_negatives its "
                                  "samples are the same every epoch and their log pi_ref is cached)")
    fixed_negatives: bool = opt(False, "cpo: draw each example's BN/MN/TN negatives once for the whole run "
                                       "(the same every epoch), for comparison; by default they are drawn "
                                       "afresh each step, as the paper's expectation over negatives does")
    ranked: bool = opt(False, "cpo: the ranked loss, eq. (2), ordering negatives by cosine similarity "
                              "to the ground truth")
    shared_prompt: bool = opt(True, "cpo/dpo: run each prompt once for its K continuations "
                                    "(false: the naive path, every sequence whole)")
    beta: float = opt(5.0, "cpo/dpo: inverse temperature of the implicit reward")
    mle_weight: float = opt(0.0, "cpo: alpha in alpha * L_MLE + L_CPO")
    an_cache: str = opt("", "cpo: folder of autoregressive negatives written by `python negatives.py`")
    dpo_rejected: str = opt("", "dpo: jsonl of {id, rejected} written by "
                                "`python evaluate.py dpo-negatives`")
    pss_samples: int = opt(3, "pss: sampled sequences per example")
    pss_p: float = opt(0.5, "pss: probability of replacing each continuation token by a sample")
    pss_warmup_steps: int = opt(0, "pss: steps over which p rises linearly from 0")
    # optimisation
    steps: int = opt(200, "optimisation steps")
    batch_size: int = opt(64, "global batch in examples = micro_batch_size x accumulation x world size")
    micro_batch_size: int = opt(8, "examples per forward pass on one rank")
    lr: float = opt(1e-5, "peak learning rate")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases, norms)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    schedule: str = opt("constant", "after warm-up: constant | cosine (down to 10%% of lr)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    # system
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = opt("auto", "compute: auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16; "
                             "the trained weights and AdamW's state are float32 always")
    ref_dtype: str = opt("float32", "pi_ref's weights: float32 | bfloat16 (CUDA only: half pi_ref's "
                                    "memory, but log pi_ref then comes from bf16-rounded weights, ~3 "
                                    "significant digits each: an error of 1e-2 or more in a sequence's "
                                    "summed log-prob)")
    save_dtype: str = opt("auto", "final/'s weights: auto (the starting checkpoint's dtype; float32 from "
                                  "scratch) | float32 | bfloat16 | float16. ckpt-N/ is always float32 "
                                  "(exact resume)")
    compile: bool = opt(False, "torch.compile the model")
    fsdp: bool = opt(False, "shard weights, gradients, AdamW state and pi_ref over the ranks "
                            "(FSDP2, fsdp.py) instead of DDP")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward: "
                                                "less memory, ~1 more forward")
    plan: bool = opt(False, "print the memory plan (plan.py) for this run and exit, reading no weights")
    plan_world_size: int = opt(0, "--plan: the number of GPUs to plan for (0: this launch's world size)")
    plan_gpu_gb: float = opt(0.0, "GiB per GPU to plan for (0: the GPU's free memory, or 80 without a GPU)")
    seed: int = opt(0, "seed of data order, negatives and initialisation")
    # output
    out_dir: str = opt("out/run", "checkpoints, logs and the final model go here")
    log_interval: int = opt(10, "steps between log lines")
    eval_interval: int = opt(100, "steps between held-out losses (0: only at the end)")
    ckpt_interval: int = opt(100, "steps between checkpoints (0: only at the end)")
    keep_last: int = opt(2, "checkpoints kept")
    resume: bool = opt(False, "continue from the newest checkpoint in out_dir that loads; refused if any "
                              f"setting other than {', '.join(sorted(SAFE_TO_CHANGE))} differs from the "
                              "checkpoint's (--steps may grow, not shrink below the checkpoint's step)")

# ----------------------------------------------------------------------------- config

def load_preset(path, experiment=False):
    """A preset is a Python file defining `config = dict(...)`, and optionally `stages` (see default.py).
    An experiment (experiments/*.py) adds `experiment`: miniature.py reads it with experiment=True."""
    if not os.path.isfile(path):
        name = os.path.basename(path)
        moved = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments", name)
        hint = (f"; miniature.py's experiments live in experiments/: python miniature.py --config "
                f"experiments/{name}") if os.path.isfile(moved) else ""
        raise SystemExit(f"{path}: no such preset file (train.py's presets are config/*.py){hint}")
    # presets import their shared settings (config/paper.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        ns = runpy.run_path(path)
    finally:
        sys.path.pop(0)
    if "experiment" in ns and not experiment:  # experiments/*.py: several seeds and runs, for miniature.py
        raise SystemExit(f"{path} is an experiment, not a train.py preset: "
                         f"run python miniature.py --config {path}")
    config, stages = ns.get("config", {}), ns.get("stages", {})
    for name, overrides in [("config", config), *stages.items()]:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Config)}
        if unknown:
            raise SystemExit(f"{path}: {name}: unknown settings {sorted(unknown)}")
    return config, stages


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


ONE_RUN = """Which runs: bare `python train.py` runs the embedded default, config/default.py's stages
(ref, mle, cpo) and a comparison table. Any flag without a preset makes exactly ONE run with these
defaults and your flags, e.g. fine-tuning your own HF folder on your own prompt/response jsonl:
    python train.py --init_from=FOLDER --task=jsonl:pairs.jsonl --objective=cpo --out_dir=out/mine
A preset file runs its config, and its stages if it has any:
    python train.py config/default.py --steps=3"""


def parse_args(argv, description=None):
    """`train.py [preset.py] [--key=value ...]`: the preset overrides the defaults, flags override both."""
    p = argparse.ArgumentParser(description=description, epilog=ONE_RUN,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default=None,
                   help="a config/*.py preset; with none, flags alone make ONE run "
                        "(only a bare `python train.py` runs config/default.py's stages)")
    for f in dataclasses.fields(Config):
        kind = {bool: parse_bool, int: int, float: float, str: str}[f.type]
        if kind is parse_bool:  # --flag alone means --flag=true
            p.add_argument(f"--{f.name}", type=kind, default=None, metavar="BOOL", nargs="?", const=True,
                           help=f"{f.metadata['help']} (default: {f.default})")
        else:
            p.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper(),
                           help=f"{f.metadata['help']} (default: {f.default})")
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    return args.preset, flags


# ----------------------------------------------------------------------------- checks

# objective's choices are train.OBJECTIVES
CHOICES = {"schedule": ("constant", "cosine"),
           "dtype": ("auto", "float32", "bfloat16"),
           "mn_model": ("policy", "ref"),
           "ref_dtype": ("float32", "bfloat16"),
           "save_dtype": ("auto", "float32", "bfloat16", "float16")}
AT_LEAST = {"n_layer": 1, "n_head": 1, "n_embd": 1, "max_len": 3, "n_train": 0, "n_val": 0, "pss_samples": 1,
            "pss_warmup_steps": 0, "steps": 1, "batch_size": 1, "micro_batch_size": 1, "warmup_steps": 0,
            "weight_decay": 0, "grad_clip": 0, "mle_weight": 0, "log_interval": 1, "eval_interval": 0,
            "ckpt_interval": 0, "keep_last": 1, "pss_p": 0}
ABOVE_ZERO = ("lr", "beta")


def validate_config(cfg):
    """SystemExit listing every bad setting (a wrong type, a value out of range, an unknown choice), so that
    none is silently ignored or crashes deep inside the run."""
    bad = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type not in (bool, int, float, str):
            continue
        if type(value) is f.type or f.type is float and type(value) is int:  # an int is a fine float
            continue
        bad.append(f"{f.name}={value!r}: expected {f.type.__name__}")
    if bad:
        raise SystemExit("bad settings:\n  " + "\n  ".join(bad))
    for k, choices in CHOICES.items():
        if getattr(cfg, k) not in choices:
            bad.append(f"--{k}={getattr(cfg, k)!r}: choose from {' | '.join(choices)}")
    for k, lo in AT_LEAST.items():
        if not getattr(cfg, k) >= lo:
            bad.append(f"--{k}={getattr(cfg, k)}: must be >= {lo}")
    for k in ABOVE_ZERO:
        if not getattr(cfg, k) > 0:
            bad.append(f"--{k}={getattr(cfg, k)}: must be > 0")
    if cfg.pss_p > 1:
        bad.append(f"--pss_p={cfg.pss_p}: a probability, must be <= 1")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        bad.append(f"--device={cfg.device!r}: choose from auto | cpu | cuda | cuda:N")
    if bad:
        raise SystemExit("bad settings:\n  " + "\n  ".join(bad))


def config_differences(old, new, step):
    """What --resume refuses: a list of 'key: old -> new' lines (empty: fine). old is the checkpoint's config
    (a dict), new the current one, step the checkpoint's. Keys only one side knows are not compared."""
    diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
             if old[k] != new[k] and k not in SAFE_TO_CHANGE]
    if new.get("steps", step) < step:
        diffs.append(f"steps: {new['steps']} is below the checkpoint's step {step}")
    elif old.get("schedule") == "cosine" and old.get("steps") != new.get("steps"):
        # the cosine spans all the steps: a new length is a new schedule
        diffs.append(f"steps: {old.get('steps')} -> {new.get('steps')} (the cosine schedule's length)")
    return diffs
