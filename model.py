"""
nanoCPO's model: one decoder-only Transformer, GPT-2 or LLaMA by `config.model_type`, with a preallocated
KV cache for decoding. Decoding itself (sampling, beam search) is decoding.py's job; reading and writing
HF folders (config.json, safetensors) is hf.py's.

    GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings
    LLaMA: RoPE (rope_theta), RMSNorm, SwiGLU, no biases, grouped-query attention, untied head (by default)

Names: tok_emb, pos_emb (gpt2), blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc, mlp.proj}, norm_f,
lm_head. attn.qkv fuses q, k, v and LLaMA's mlp.fc fuses gate and up (gate first): one matmul instead of
three (two), which matters most in a decoding step, where every kernel launch counts.

A decoding step needs three things from here: positions_and_mask (a row's positions and attention mask,
its prompt and every token to come), Transformer.new_kv_cache and Transformer.next_logits.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    model_type: str = "gpt2"            # "gpt2" | "llama"
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12                    # query heads
    n_kv_head: int = 12                 # key/value heads (< n_head: grouped-query attention, LLaMA only)
    n_embd: int = 768
    n_inner: int = 3072                 # MLP hidden size
    max_seq_len: int = 1024             # GPT-2's position table size; LLaMA's trained context
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0         # LLaMA only
    tie_word_embeddings: bool = True    # lm_head shares the token embedding
    bos_id: int | None = 50256          # as in config.json; the tokenizer decides whether prompts get a BOS
    eos_id: int | None = 50256

    def __post_init__(self):
        if self.model_type not in ("gpt2", "llama"):
            raise ValueError(f"unknown model_type {self.model_type!r} (expected 'gpt2' or 'llama')")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.model_type == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("gpt2 has no grouped-query attention: n_kv_head must equal n_head")
        if self.model_type == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got {self.n_embd // self.n_head}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# ----------------------------------------------------------------------------- layers
# Linear's CPU path for a decoding step, whose x has one row per sequence. For so few rows MKL computes
# x @ W.T on one core at a fraction of the memory bandwidth; cutting W into blocks shares them among threads.
FEW_ROWS = 16            # the rows (sequences in a decoding step) this path is for; bigger x go to F.linear
BLOCK_WEIGHTS = 2**18    # weights per block, 1 MB of float32: measured faster than one block per thread


class Linear(nn.Linear):
    """nn.Linear with a faster CPU path for the few rows of a decoding step: W cut into row blocks of about
    BLOCK_WEIGHTS (a multiple of the thread count), handed to one bmm, so the threads share the blocks and
    each small product runs near bandwidth. Measured on a 2-core machine, GPT-2 small: a batch-8 decoding
    step takes ~80 ms, against ~105 ms with one block per thread and ~190 ms with F.linear."""

    def forward(self, x):
        if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor picks its own kernel
            return F.linear(x, self.weight, self.bias)
        rows, threads = x.numel() // x.shape[-1], torch.get_num_threads()
        if rows > FEW_ROWS or threads == 1:
            return F.linear(x, self.weight, self.bias)
        N, K = self.weight.shape
        nb = max(threads, N * K // BLOCK_WEIGHTS // threads * threads)     # number of blocks
        m = N - N % nb                                                       # rows of W that split evenly
        x2 = x.reshape(rows, K)
        blocks = self.weight[:m].view(nb, m // nb, K).transpose(1, 2)     # (nb, K, m / nb)
        y = torch.bmm(x2.expand(nb, rows, K), blocks)                       # (nb, rows, m / nb)
        y = y.transpose(0, 1).reshape(rows, m)                              # (rows, m)
        if m < N:
            y = torch.cat([y, F.linear(x2, self.weight[m:])], dim=1)        # (rows, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], N)                                     # (..., N)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()  # in float32, as LLaMA does, so half-precision inputs don't lose the mean square
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def make_norm(cfg):
    if cfg.model_type == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_cos_sin(pos, head_dim, theta, dtype):
    """pos (B, T) -> cos, sin (B, 1, T, head_dim) in HF's half-split layout, computed in float32.
    Computed per call from positions (not a buffer) so a model built on the meta device needs no fix-up."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)  # (hd/2,)
    ang = pos[..., None].float() * inv_freq                  # (B, T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]             # (B, 1, T, hd)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)                              # (B, nh, T, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin      # rotate pairs (i, i + hd/2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.model_type == "gpt2"
        self.qkv = Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=bias)
        self.proj = Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=bias)

    def forward(self, x, rope=None, mask=None, cache=None, start=0):
        if isinstance(mask, SharedPrompt):
            return self.shared_prompt(x, rope, mask)
        B, T, _ = x.shape                                                   # (B, T, C)
        q, k, v = self.split_heads(self.qkv(x), rope)                      # (B, nh | nkv, T, hd)
        if cache is not None:  # write this step's keys/values, attend over the slots filled so far
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]  # (B, nkv, start + T, hd)
        # SDPA shares each kv head among n_head / n_kv_head query heads itself (no repeat_interleave copy)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))             # (B, T, C)

    def split_heads(self, qkv, rope):
        """qkv (B, T, (nh + 2 nkv) hd) -> q, k, v (B, nh | nkv, T, hd), RoPE applied when given."""
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, -1, self.head_dim).transpose(1, 2)           # (B, nh + 2 nkv, T, hd)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def shared_prompt(self, x, rope, sp):
        """x (1, B P + B K S, C) packed as `sp` says -> (1, B P + B K S, C). The prompts attend to
        themselves as in forward; each continuation attends to its own prompt's keys/values, computed once,
        then causally to itself. The prompt's k/v are an expanded view over the K continuations; the cat with
        the continuation's own k/v is the one copy SDPA needs (2 nkv hd numbers per prompt token and
        continuation)."""
        B, P, K, S = sp.B, sp.P, sp.K, sp.S
        rope_p = rope_c = None
        if rope is not None:  # (1, 1, N, hd) each -> prompts' (B, 1, P, hd), continuations' (B K, 1, S, hd)
            (cos_p, cos_c), (sin_p, sin_c) = (unpack(r[0, 0], sp) for r in rope)
            rope_p, rope_c = (cos_p[:, None], sin_p[:, None]), (cos_c[:, None], sin_c[:, None])
        qkv_p, qkv_c = unpack(self.qkv(x[0]), sp)                          # (B, P, .), (B K, S, .)
        q_p, k_p, v_p = self.split_heads(qkv_p, rope_p)                    # (B, nh | nkv, P, hd)
        q_c, k_c, v_c = self.split_heads(qkv_c, rope_c)                    # (B K, nh | nkv, S, hd)
        gqa = self.n_kv_head != self.n_head
        y_p = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=sp.prompt_mask, enable_gqa=gqa)

        def with_prompt(t_p, t_c):  # (B, nkv, P, hd), (B K, nkv, S, hd) -> (B K, nkv, P + S, hd)
            t_c = t_c.view(B, K, *t_c.shape[1:])                              # (B, K, nkv, S, hd)
            return torch.cat([t_p[:, None].expand(B, K, *t_p.shape[1:]), t_c], dim=3).flatten(0, 1)
        y_c = F.scaled_dot_product_attention(q_c, with_prompt(k_p, k_c), with_prompt(v_p, v_c),
                                             attn_mask=sp.cont_mask, enable_gqa=gqa)  # (B K, nh, S, hd)
        y = torch.cat([y_p.transpose(1, 2).reshape(B * P, -1), y_c.transpose(1, 2).reshape(B * K * S, -1)])
        return self.proj(y[None])                                           # (1, N, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gpt2 = cfg.model_type == "gpt2"
        hidden = cfg.n_inner if self.gpt2 else 2 * cfg.n_inner     # llama: gate and up in one matmul
        self.fc = Linear(cfg.n_embd, hidden, bias=self.gpt2)
        self.proj = Linear(cfg.n_inner, cfg.n_embd, bias=self.gpt2)

    def forward(self, x):
        if self.gpt2:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        gate, up = self.fc(x).chunk(2, dim=-1)                         # (B, T, n_inner) each
        return self.proj(F.silu(gate) * up)                            # SwiGLU, (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, rope=None, mask=None, cache=None, start=0):
        x = x + self.attn(self.norm1(x), rope, mask, cache, start)
        return x + self.mlp(self.norm2(x))


def positions_and_mask(attention_mask, S):
    """attention_mask (B, T) 0/1 -> positions (B, S), bool attention mask (B, 1, S, S), for T prompt tokens
    plus S - T tokens to come. Positions count from each row's first real token; pad keys are hidden. Every
    query sees itself so no row is all-False: SDPA gives NaN for those, and 0 * NaN leaks into real rows."""
    B, T = attention_mask.shape
    real = torch.ones(B, S, dtype=torch.bool, device=attention_mask.device)
    real[:, :T] = attention_mask.bool()
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)                    # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=real.device)
    return pos, ((causal & real[:, None, :]) | eye)[:, None]          # (B, S), (B, 1, S, S)


@dataclass
class SharedPrompt:
    """How a packed row of B P + B K S tokens reads (Transformer.forward_shared_prompt): first B
    left-padded prompts of P tokens, then each prompt's K right-padded continuations of S tokens. Every
    layer but attention works token by token, so only Attention unpacks it (passed in trunk's `mask` slot)."""
    B: int
    P: int
    K: int
    S: int
    prompt_mask: torch.Tensor  # (B, 1, P, P) bool, the prompts' own (positions_and_mask)
    cont_mask: torch.Tensor    # (B K, 1, S, P + S) bool: the prompt's real tokens, then causal over itself


def unpack(t, sp):
    """t (B P + B K S, d) packed tokens -> the prompts' (B, P, d) and the continuations' (B K, S, d)."""
    t_p, t_c = t.split([sp.B * sp.P, sp.B * sp.K * sp.S])
    return t_p.view(sp.B, sp.P, -1), t_c.view(sp.B * sp.K, sp.S, -1)


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        # on the meta device (hf.load, plan.py) nn.Embedding's own N(0, 1) init costs seconds (it imports
        # torch._dynamo) for nothing: give it an empty weight there; elsewhere it runs as always (same RNG
        # draws)
        empty = (lambda *shape: torch.empty(shape)) if torch.empty(0).is_meta else (lambda *shape: None)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=empty(cfg.vocab_size, cfg.n_embd))
        self.pos_emb = (nn.Embedding(cfg.max_seq_len, cfg.n_embd, _weight=empty(cfg.max_seq_len, cfg.n_embd))
                        if cfg.model_type == "gpt2" else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # train.py --activation_checkpointing: keep only each block's input for the backward and recompute
        # the rest there (about one more forward of time for a block's worth of activations instead of L)
        self.checkpoint_blocks = False
        self.init_weights()
        self.tie_weights()
        # load_state_dict(assign=True) swaps parameters in one by one, which unties them: re-tie afterwards
        self.register_load_state_dict_post_hook(_retie_after_load)

    def init_weights(self):
        """GPT-2's init for training from scratch: N(0, 0.02), residual projections scaled by
        1/sqrt(2 n_layer) so the residual stream's variance doesn't grow with depth. (A no-op on the meta
        device.)"""
        if self.tok_emb.weight.is_meta:  # loading will assign every tensor; nn.init on meta is slow
            return
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx, return_hidden=False, *, attention_mask=None, continuations=None):
        """idx (B, T) -> logits (B, T, V), or the final-normed hidden states (B, T, C) with return_hidden.
        attention_mask (B, T) 0/1 (optional, left or right padding): positions count real tokens only and
        pad keys are hidden; without it every row is a plain causal sequence. With continuations (B, K, S):
        forward_shared_prompt's hidden states, idx being the prompts, LEFT-padded by attention_mask."""
        if continuations is not None:
            return self.forward_shared_prompt(idx, attention_mask, continuations)
        B, T = idx.shape
        self.check_length(T)
        if attention_mask is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # mask None: SDPA's fast causal path
        else:
            pos, mask = positions_and_mask(attention_mask, T)
        x = self.trunk(idx, pos, mask)                                     # (B, T, C)
        return x if return_hidden else self.lm_head(x)                     # (B, T, V)

    def forward_shared_prompt(self, prompt, prompt_mask, cont):
        """B prompts with K continuations each, every prompt run once: prompt (B, P) LEFT-padded
        (prompt_mask (B, P) 0/1, None: no padding), cont (B, K, S) right-padded -> final-normed hidden
        states of the prompts (B, P, C) and of the continuations (B, K, S, C): the ordinary forward's numbers
        on each prompt + continuation. All B P + B K S tokens go through trunk as one packed row; gradients
        reach a prompt's computation from all its K continuations, summed, as in the naive path."""
        (B, P), (_, K, S), dev = prompt.shape, cont.shape, prompt.device
        prompt_mask = torch.ones_like(prompt) if prompt_mask is None else prompt_mask
        pos_p, mask_p = positions_and_mask(prompt_mask, P)                 # (B, P), (B, 1, P, P)
        # (B, S): the continuations' positions count from each prompt's true length
        pos_c = prompt_mask.sum(-1, keepdim=True) + torch.arange(S, device=dev)
        if self.pos_emb is not None:  # past the table can only be padding (the caller's rows fit)
            pos_c = pos_c.clamp(max=self.config.max_seq_len - 1)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        see = torch.cat([prompt_mask.bool()[:, None, None, None].expand(B, K, 1, S, P),
                         causal.expand(B, K, 1, S, S)], dim=-1)            # (B, K, 1, S, P + S)
        sp = SharedPrompt(B, P, K, S, mask_p, see.flatten(0, 1))
        idx = torch.cat([prompt.reshape(-1), cont.reshape(-1)])[None]      # (1, B P + B K S)
        pos = torch.cat([pos_p.reshape(-1), pos_c[:, None].expand(B, K, S).reshape(-1)])[None]
        h_p, h_c = unpack(self.trunk(idx, pos, sp)[0], sp)                 # (B, P, C), (B K, S, C)
        return h_p, h_c.view(B, K, S, -1)

    def trunk(self, idx, pos, mask=None, cache=None, start=0):
        """idx (B, T), pos (B or 1, T) -> final-normed hidden (B, T, C). With a cache (one (k, v) per
        layer, each (B, nkv, S, hd)) the new keys/values go to [start, start + T) and mask is
        (B, 1, T, start + T)."""
        x = self.tok_emb(idx)                                              # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_blocks and cache is None and torch.is_grad_enabled():
                # (B, T, C), its insides recomputed in the backward
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache[i] if cache else None, start)
        return self.norm_f(x)

    def check_length(self, T):  # past the position table, nn.Embedding's IndexError says nothing useful
        if self.pos_emb is not None and T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens is more than the model's {self.config.max_seq_len} positions")

    def new_kv_cache(self, B, S):
        """One (k, v) pair per layer, each (B, nkv, S, hd), for S positions."""
        shape = (B, self.config.n_kv_head, S, self.config.head_dim)
        w = self.tok_emb.weight
        # zeros, not empty: unwritten slots are masked, but garbage NaNs would survive 0 * NaN
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.blocks]

    def next_logits(self, idx, pos, mask, cache, start):
        """One cached forward: idx (B, T) into cache slots [start, start + T) -> the last position's
        logits (B, V). pos (B, S) and mask (B, 1, S, S) cover the whole sequence; a step reads only the slots
        filled so far (at batch 32 of a small model, reading the cache's empty tail was a third of the
        attention time)."""
        end = start + idx.shape[1]
        h = self.trunk(idx, pos[:, start:end], mask[:, :, start:end, :end], cache, start)  # (B, T, C)
        return self.lm_head(h[:, -1])                                      # (B, V)


def _retie_after_load(model, incompatible_keys):
    model.tie_weights()
    if model.config.tie_word_embeddings and "lm_head.weight" in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove("lm_head.weight")  # it is tok_emb.weight


def resolve_device(name="auto"):
    """A --device setting -> a device name: "auto" (or None) is this process's GPU when there is one
    (cuda:LOCAL_RANK under torchrun), else cpu. The one place train.py, negatives.py and evaluate.py ask."""
    if name in (None, "auto"):
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return name
