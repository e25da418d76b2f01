"""
nanoCPO's model: one decoder-only Transformer, GPT-2 or LLaMA by `config.model_type`, and generation with a
preallocated KV cache. Reading and writing HF folders (config.json, safetensors) is hf.py's job.

    GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings
    LLaMA: RoPE (rope_theta), RMSNorm, SwiGLU, no biases, grouped-query attention, untied head (by default)

Names: tok_emb, pos_emb (gpt2), blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc, mlp.proj}, norm_f,
lm_head. attn.qkv fuses q, k, v and LLaMA's mlp.fc fuses gate and up (gate first): one matmul instead of
three (two), which matters most in a decoding step, where every kernel launch counts.

Generation, in the order it runs: Transformer.generate -> prefill (the prompts into a fresh cache) ->
decode_n_tokens (sample_next_token, then decode_one_token, until every row has its EOS), or beam_search.
"""
import math
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
        """x (1, B P + B K S, C) packed as `sp` says -> (1, B P + B K S, C). The prompts attend to themselves as
        in forward; each continuation attends to its own prompt's keys/values, computed once, then causally to
        itself. The prompt's k/v are an expanded view over the K continuations; the cat with the continuation's
        own k/v is the one copy SDPA needs (2 nkv hd numbers per prompt token and continuation)."""
        B, P, K, S = sp.B, sp.P, sp.K, sp.S
        rope_p = rope_c = None
        if rope is not None:  # (1, 1, N, hd) each -> the prompts' (B, 1, P, hd), the continuations' (B K, 1, S, hd)
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
    """How a packed row of B P + B K S tokens reads (Transformer.forward_shared_prompt): first B left-padded
    prompts of P tokens, then each prompt's K right-padded continuations of S tokens. Every layer but attention
    works token by token, so only Attention unpacks it (passed in trunk's `mask` slot)."""
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
        # torch._dynamo) for nothing: give it an empty weight there; elsewhere it runs as always (same RNG draws)
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
        """GPT-2's init for training from scratch: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)
        so the residual stream's variance doesn't grow with depth. (A no-op on the meta device.)"""
        if self.tok_emb.weight.is_meta:  # loading will assign every tensor; nn.init on meta is needlessly slow
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
        self._check_length(T)
        if attention_mask is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # mask None: SDPA's fast causal path
        else:
            pos, mask = positions_and_mask(attention_mask, T)
        x = self.trunk(idx, pos, mask)                                     # (B, T, C)
        return x if return_hidden else self.lm_head(x)                     # (B, T, V)

    def forward_shared_prompt(self, prompt, prompt_mask, cont):
        """B prompts with K continuations each, every prompt run once: prompt (B, P) LEFT-padded (prompt_mask
        (B, P) 0/1, None: no padding), cont (B, K, S) right-padded -> final-normed hidden states of the prompts
        (B, P, C) and of the continuations (B, K, S, C): the ordinary forward's numbers on each prompt +
        continuation. All B P + B K S tokens go through trunk as one packed row; gradients reach a prompt's
        computation from all its K continuations, summed, as in the naive path."""
        (B, P), (_, K, S), dev = prompt.shape, cont.shape, prompt.device
        prompt_mask = torch.ones_like(prompt) if prompt_mask is None else prompt_mask
        pos_p, mask_p = positions_and_mask(prompt_mask, P)                 # (B, P), (B, 1, P, P)
        pos_c = prompt_mask.sum(-1, keepdim=True) + torch.arange(S, device=dev)  # (B, S): from the true length
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
        """idx (B, T), pos (B or 1, T) -> final-normed hidden (B, T, C). With a cache (one (k, v) per layer,
        each (B, nkv, S, hd)) the new keys/values go to [start, start + T) and mask is (B, 1, T, start + T)."""
        x = self.tok_emb(idx)                                              # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_blocks and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)   # (B, T, C), recomputed in backward
            else:
                x = block(x, rope, mask, cache[i] if cache else None, start)
        return self.norm_f(x)

    def _check_length(self, T):  # past the position table, nn.Embedding's IndexError says nothing useful
        if self.pos_emb is not None and T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens is more than the model's {self.config.max_seq_len} positions")

    def new_kv_cache(self, B, S):
        """One (k, v) pair per layer, each (B, nkv, S, hd), for S positions."""
        shape = (B, self.config.n_kv_head, S, self.config.head_dim)
        w = self.tok_emb.weight
        # zeros, not empty: unwritten slots are masked, but garbage NaNs would survive 0 * NaN
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.blocks]

    def next_logits(self, idx, pos, mask, cache, start):
        """One cached forward: idx (B, T) into cache slots [start, start + T) -> last position's logits (B, V).
        pos (B, S) and mask (B, 1, S, S) cover the whole sequence; a step reads only the slots filled so far
        (at batch 32 of a small model, reading the cache's empty tail was a third of the attention time)."""
        end = start + idx.shape[1]
        h = self.trunk(idx, pos[:, start:end], mask[:, :, start:end, :end], cache, start)  # (B, T, C)
        return self.lm_head(h[:, -1])                                      # (B, V)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
                 num_beams=1, length_penalty=1.0, eos_id=None, pad_id=None, generator=None):
        """idx (B, T) prompts, LEFT-padded when attention_mask (B, T) is given -> (B, max_new_tokens) new tokens.
        temperature 0 = greedy. eos_id None = config.eos_id (-1: never stop); after a row's EOS come pad_id
        (default eos_id). num_beams > 1: beam search with HF's scoring (sum of log-probs / new_length **
        length_penalty), returning each row's best hypothesis (sampling arguments are ignored)."""
        B, T = idx.shape
        eos_id = self.config.eos_id if eos_id is None else eos_id
        eos_id = -1 if eos_id is None else eos_id                          # no token is -1
        pad_id = (eos_id if eos_id >= 0 else 0) if pad_id is None else pad_id
        if max_new_tokens <= 0:
            return idx.new_full((B, max_new_tokens), pad_id)
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        elif (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("generate needs LEFT-padded prompts: each attention_mask row must be 0..0 1..1")
        S = T + max_new_tokens
        self._check_length(S)
        pos, mask = positions_and_mask(attention_mask, S)                  # (B, S), (B, 1, S, S)
        if num_beams > 1:
            return beam_search(self, idx, pos, mask, max_new_tokens, num_beams, length_penalty, eos_id, pad_id)
        return decode_n_tokens(self, idx, pos, mask, max_new_tokens, eos_id, pad_id,
                               temperature, top_k, top_p, generator)


def _retie_after_load(model, incompatible_keys):
    model.tie_weights()
    if model.config.tie_word_embeddings and "lm_head.weight" in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove("lm_head.weight")  # it is tok_emb.weight


# ----------------------------------------------------------------------------- generation
# A row's positions pos (B, S) and attention mask (B, 1, S, S) cover its prompt and every token to come;
# the cache has a slot per position, and the token generated at step t goes to slot T + t.

def left_pad(prompts, pad_id):
    """Prompts (lists of ids) -> idx (B, T) left-padded and attention_mask (B, T), 0 on padding: generate's input."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask


def prefill(model, idx, pos, mask):
    """The prompts idx (B, T) into a fresh cache -> (logits for the first new token (B, V), the cache)."""
    cache = model.new_kv_cache(*pos.shape)
    return model.next_logits(idx, pos, mask, cache, 0), cache


def decode_one_token(model, tok, pos, mask, cache, slot):
    """tok (B,) into cache slot `slot` -> logits for the token after it (B, V)."""
    return model.next_logits(tok[:, None], pos, mask, cache, slot)


def decode_n_tokens(model, idx, pos, mask, n, eos_id, pad_id, temperature, top_k, top_p, generator):
    """Sample n tokens after the prompts idx (B, T) -> (B, n); after a row's EOS comes pad_id."""
    B, T = idx.shape
    out = idx.new_full((B, n), pad_id)
    logits, cache = prefill(model, idx, pos, mask)                         # (B, V)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for t in range(n):
        tok = sample_next_token(logits, temperature, top_k, top_p, generator).masked_fill(done, pad_id)  # (B,)
        done |= tok == eos_id
        out[:, t] = tok
        # asking "all done?" makes the host wait for the device, so only every 8th step
        if t == n - 1 or (t % 8 == 7 and bool(done.all())):
            break
        logits = decode_one_token(model, tok, pos, mask, cache, T + t)
    return out


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next tokens (B,). temperature 0 = greedy (argmax). Otherwise sample from
    softmax(logits / temperature), restricted first to the top_k logits (a tie at the k-th is broken by
    torch.topk), then to the nucleus: the most likely tokens up to and including the one that brings their
    mass to top_p (HF's order and rule). The only place nanoCPO samples; its randomness use doesn't depend
    on the logits' values."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, index = logits.float() / temperature, None
    if top_k is not None:  # from here on only the k candidates: at V = 50257 and k = 50 that is 1000x less work
        logits, index = logits.topk(min(top_k, logits.size(-1)), dim=-1)    # (B, k), best first
    if top_p is not None and top_p < 1.0:
        if index is None:
            logits, index = logits.sort(dim=-1, descending=True)            # (B, V), best first
        p = logits.softmax(dim=-1)
        logits = logits.masked_fill(p.cumsum(dim=-1) - p >= top_p, float("-inf"))  # mass before it >= top_p
    probs = logits.softmax(dim=-1)
    # argmax of p / Exp(1) noise is an exact draw from p (the exponential race, = Gumbel-max) and, unlike
    # torch.multinomial, never makes the host wait for the device
    noise = torch.empty_like(probs).exponential_(1, generator=generator).clamp_(min=1e-30)
    choice = (probs / noise).argmax(dim=-1)                                  # (B,)
    return choice if index is None else index.gather(-1, choice[:, None]).squeeze(-1)


def beam_search(model, idx, pos, mask, n, nb, length_penalty, eos_id, pad_id):
    """HF's beam search with early_stopping=False: nb beams per prompt of idx (B, T) -> each row's best
    hypothesis (B, n). Per step keep the 2 nb best (beam, token) candidates so nb beams stay alive even if
    some end; an ending candidate (EOS, or the last step) among the top nb becomes a finished hypothesis
    scored logp_sum / n_new ** length_penalty, and the nb best finished are kept. A row stops once nb are
    finished and its best live beam, scored at its current length, can't beat the worst of them.
    A score of -inf marks what doesn't count: beams not started, ended candidates, empty finished slots."""
    B, T = idx.shape
    V, dev, never = model.config.vocab_size, idx.device, -math.inf
    rows = torch.arange(B, device=dev).repeat_interleave(nb)            # (B nb,) prompt row of each beam
    pos, mask = pos[rows], mask[rows]
    logits, cache = prefill(model, idx[rows], pos, mask)                 # (B nb, V)

    seqs = idx.new_full((B, nb, n), pad_id)                              # live beams
    scores = torch.full((B, nb), never, device=dev)                      # their summed log-probs
    scores[:, 0] = 0.0                                                   # all beams start equal: expand one
    fin_seqs, fin_scores = seqs.clone(), torch.full((B, nb), never, device=dev)  # finished, best first
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    in_top_nb = torch.arange(2 * nb, device=dev) < nb
    offset = torch.arange(B, device=dev)[:, None] * nb
    for t in range(n):
        logp = F.log_softmax(logits.float(), dim=-1).view(B, nb, V) + scores[..., None]  # (B, nb, V)
        cand_scores, cand = logp.view(B, nb * V).topk(2 * nb)            # (B, 2 nb), best first
        beam, tok = cand // V, cand % V
        cand_seqs = take(seqs, beam)                                      # (B, 2 nb, n)
        cand_seqs[:, :, t] = tok
        ends = (tok == eos_id) | (t == n - 1)                             # max length ends them all
        # the nb best candidates that didn't end go on
        live = cand_scores.masked_fill(ends, never)
        keep = live.topk(nb).indices                                      # (B, nb)
        seqs, scores, src = take(cand_seqs, keep), take(live, keep), take(beam, keep)
        # the nb best finished hypotheses so far, from the old ones and the ending candidates that count
        counts = ends & in_top_nb & can_improve                          # (B, 2 nb)
        new_scores = (cand_scores / (t + 1) ** length_penalty).masked_fill(~counts, never)
        fin_seqs, fin_scores = best_of(torch.cat([fin_seqs, cand_seqs], dim=1),
                                       torch.cat([fin_scores, new_scores], dim=1), nb)
        if t == n - 1:
            break
        worst = fin_scores[:, -1:]                                        # (B, 1), -inf until nb are finished
        can_improve &= scores[:, :1] / (t + 1) ** length_penalty > worst
        if not bool(can_improve.any()):
            break
        flat = (src + offset).view(-1)                                    # (B nb,) cache row each beam extends
        cache = [(k[flat], v[flat]) for k, v in cache]
        logits = decode_one_token(model, seqs[:, :, t].reshape(-1), pos, mask, cache, T + t)  # (B nb, V)
    return fin_seqs[:, 0]


def best_of(seqs, scores, k):
    """seqs (B, J, n), scores (B, J) -> the k best of each row (B, k, n), (B, k), best first."""
    best = scores.topk(k).indices
    return take(seqs, best), take(scores, best)


def take(x, i):
    """x (B, K, ...), i (B, J) -> x[b, i[b, j]] (B, J, ...): pick beams/candidates per row."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], i]
