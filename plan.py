"""
The memory plan of a training run (train.py), printed before any weights are read: what one GPU holds
under DDP and under FSDP at the run's world size, with and without activation checkpointing, and whether
that fits. `python train.py PRESET --plan [--plan_world_size=8] [--plan_gpu_gb=80]` prints it and exits.

Per GPU, N parameters, W ranks, d = 2 bytes under bf16 (CUDA) else 4, for a float32 master copy and AdamW:
                  DDP                               FSDP (fully_shard, one unit per block + the root)
    weights       4N (+ dN bf16 copies, autocast)   4N/W + d(N_root + 2 N_block): the root stays gathered,
                                                    one block computes while the next is prefetched
    gradients     4N + 4N (DDP's reducer buckets)   4N/W + 4 N_block (one unit's full gradient,
                                                    reduce-scatter)
    AdamW         8N (two float32 moments)          8N/W
    pi_ref        4N (cpo/dpo; no grads, no AdamW)  4N/W + d N_root
    activations   S (L A + E): the saved tensors of one micro-batch's forward, S = micro_batch_size x K
                  sequences x (max_len - 1) tokens; K = 1 (mle), 1 + negatives (cpo), 2 (dpo),
                  pss_samples (pss)
    checkpointed  S (L 4C + E) + S A: each block keeps its float32 input; one block's activations are
                  remade at a time in the backward

A, the bytes one block saves per token (C = width, I = MLP width), counted with
torch.autograd.graph.saved_tensors_hooks on our model (tests/test_plan.py checks the formula that way):
    GPT-2: 8C + d(6C + 2I): 2 float32 residuals, then d bytes each for the 2 norm outputs, q k v,
           the attention output, the fc and GELU outputs
    LLaMA: 16C + d(8C + 4I): 4 float32 tensors (2 residuals, 2 RMSNorm products), the rest at d bytes
E, per token outside the blocks (final norm and its input, float32): 8C (GPT-2), 12C (LLaMA).
The (N, T, V) logits never exist (cpo.sequence_logprobs_from_hidden), so the vocabulary adds no term.
Not counted: allocator fragmentation, CUDA context (~0.5 GB), pi_ref's forward temporaries, NCCL buffers.
"""
import json
import os

import torch

from hf import config_from_hf
from model import ModelConfig, Transformer
from negatives import parse_spec
from tokenizer import byte_tokenizer

GiB = 2**30
ASSUMED_GPU_GIB = 80  # without a GPU and without --plan_gpu_gb: plan for an A100-80GB, the paper's GPU
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "models")
# a model folder that does not exist yet (an SFT stage still to run) is planned from the base model
# its name names
BASE_MODELS = {"gpt2xl": "gpt2-xl", "gpt2-xl": "gpt2-xl",
               "llama3b": "open_llama_3b", "open_llama_3b": "open_llama_3b"}


def scratch_model_config(cfg):
    """The model --init_from=scratch builds (train.starting_model): a GPT-2 of the run's sizes on the byte
    tokenizer."""
    tok = byte_tokenizer()
    return ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=4 * cfg.n_embd,
                       max_seq_len=cfg.max_len, norm_eps=1e-5, tie_word_embeddings=True,
                       bos_id=tok.bos_id, eos_id=tok.eos_id)


def model_config(cfg):
    """(ModelConfig, where it came from) for the run, from config.json only: never a weight file."""
    if cfg.init_from == "scratch":
        return scratch_model_config(cfg), "scratch"
    path = os.path.join(cfg.init_from, "config.json")
    if not os.path.isfile(path):
        base = next((v for k, v in BASE_MODELS.items() if k in cfg.init_from.lower()), None)
        if base is None:
            raise SystemExit(f"plan: {path} does not exist and {cfg.init_from!r} names none of "
                             f"{sorted(BASE_MODELS)}; "
                             f"give --init_from a folder with a config.json (weights not needed)")
        path = os.path.join(BUNDLED, base, "config.json")
    with open(path) as f:
        return config_from_hf(json.load(f)), os.path.relpath(path)


def count_parameters(config):
    """(all, one block's, the root's) parameter counts, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    n = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    block = sum(p.numel() for p in model.blocks[0].parameters())
    return n, block, n - config.n_layer * block


def sequences_per_example(cfg):
    """K: the sequences one example puts through the policy in a step."""
    if cfg.objective == "cpo":
        return 1 + sum(n for _, n in parse_spec(cfg.negatives))
    return {"dpo": 2, "pss": cfg.pss_samples}.get(cfg.objective, 1)


def activation_bytes_per_token(config, d):
    """(A, E): bytes one block saves per token for the backward, and bytes per token outside the blocks."""
    C, I = config.n_embd, config.n_inner
    if config.model_type == "gpt2":
        return 4 * 2 * C + d * (6 * C + 2 * I), 4 * 2 * C
    return 4 * 4 * C + d * (8 * C + 4 * I), 4 * 3 * C


def activation_bytes(config, tokens, d, checkpointed):
    """Bytes of one micro-batch's saved activations, tokens = sequences x (max_len - 1)."""
    A, E = activation_bytes_per_token(config, d)
    if checkpointed:
        return tokens * (config.n_layer * 4 * config.n_embd + E + A)
    return tokens * (config.n_layer * A + E)


def per_gpu(cfg, config, counts, world, d, fsdp, checkpointed):
    """{row: bytes} one GPU holds for this run (the formulas in the module docstring);
    counts from count_parameters."""
    n, block, root = counts
    tokens = cfg.micro_batch_size * sequences_per_example(cfg) * (cfg.max_len - 1)
    has_ref = cfg.objective in ("cpo", "dpo")
    if fsdp:
        rows = {"weights": 4 * n / world + d * (root + 2 * block),
                "gradients": 4 * n / world + 4 * block,
                "AdamW state": 8 * n / world,
                "pi_ref": (4 * n / world + d * root) * has_ref}
    else:
        rows = {"weights": 4 * n + (d == 2) * 2 * n,
                "gradients": 4 * n + (world > 1) * 4 * n,
                "AdamW state": 8 * n,
                "pi_ref": 4 * n * has_ref}
    rows["activations"] = activation_bytes(config, tokens, d, checkpointed)
    return rows


def gpu_budget(cfg, device):
    """(bytes, what they are): --plan_gpu_gb, else this GPU's free memory, else the assumed A100-80GB."""
    if cfg.plan_gpu_gb:
        return cfg.plan_gpu_gb * GiB, f"{cfg.plan_gpu_gb:g} GiB (--plan_gpu_gb)"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{free / GiB:.1f} GiB free on {torch.cuda.get_device_name(device)}"
    where = f"{ASSUMED_GPU_GIB} GiB assumed (no GPU here; an A100-80GB, --plan_gpu_gb to change)"
    return ASSUMED_GPU_GIB * GiB, where


def plan(cfg, world, device):
    """(the table as text, the bytes of every (fsdp, checkpointed) setting, the budget, its description)."""
    config, source = model_config(cfg)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and (device.type == "cuda" or cfg.plan))
    d = 2 if bf16 else 4
    counts = count_parameters(config)
    settings = {}
    for fsdp in (False, True):
        for checkpointed in (False, True):
            settings[fsdp, checkpointed] = per_gpu(cfg, config, counts, world, d, fsdp, checkpointed)
    n = counts[0]
    budget, where = gpu_budget(cfg, device)
    K = sequences_per_example(cfg)
    lines = [f"memory plan: {config.model_type}, {config.n_layer} layers, {n:,} parameters ({source}); "
             f"{cfg.objective}, {world} rank(s), "
             f"micro-batch {cfg.micro_batch_size} x {K} sequences x {cfg.max_len} tokens, "
             f"{'bf16' if d == 2 else 'float32'} compute",
             "| per GPU, GiB | DDP | DDP + ckpt | FSDP | FSDP + ckpt |",
             "|---|---:|---:|---:|---:|"]
    for row in settings[False, False]:
        lines.append(f"| {row} | " + " | ".join(f"{settings[s][row] / GiB:.1f}" for s in settings) + " |")
    totals = {s: sum(rows.values()) for s, rows in settings.items()}
    lines.append("| **total** | " + " | ".join(f"**{totals[s] / GiB:.1f}**" for s in settings) + " |")
    lines.append(f"GPU memory: {where}")
    return "\n".join(lines), totals, budget


def flags_of(fsdp, checkpointed):
    flags = [f for f, on in (("--fsdp", fsdp), ("--activation_checkpointing", checkpointed)) if on]
    return " ".join(flags) or "(none)"


def verdict(cfg, totals, budget):
    """None if this run's setting fits the budget, else a message naming the flags that would make it fit."""
    mine = (cfg.fsdp, cfg.activation_checkpointing)
    if totals[mine] <= budget:
        return None
    fitting = [s for s in ((False, True), (True, False), (True, True)) if totals[s] <= budget and s != mine]
    fix = (f"add {flags_of(*fitting[0])} ({totals[fitting[0]] / GiB:.1f} GiB)" if fitting else
           "no setting fits at this micro_batch_size: try --fsdp --activation_checkpointing with a smaller "
           "--micro_batch_size, or more GPUs")
    this_run = flags_of(*mine) if any(mine) else "DDP, no checkpointing"
    return (f"this run ({this_run}) needs {totals[mine] / GiB:.1f} GiB per GPU, "
            f"more than the {budget / GiB:.1f} GiB there is: {fix}")


def check(cfg, world, device, log=print):
    """Print the plan; stop the run (SystemExit) if it cannot fit.
    Called by train.py before loading weights."""
    table, totals, budget = plan(cfg, world, device)
    log(table)
    problem = verdict(cfg, totals, budget)
    for s in ((False, False), (False, True), (True, False), (True, True)):
        fits = "fits" if totals[s] <= budget else "does NOT fit"
        log(f"  {flags_of(*s):40s} {totals[s] / GiB:7.1f} GiB  {fits}")
    if problem and (device.type == "cuda" or cfg.plan or cfg.plan_gpu_gb):
        if cfg.plan:
            log(f"plan: {problem}")
        else:
            raise SystemExit(f"memory plan: {problem}")
    return totals
