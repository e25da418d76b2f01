"""
nanoCPO's model: one decoder-only Transformer, GPT-2 or LLaMA by `config.model_type`, that reads and writes
HF-format weights and generates with a preallocated KV cache.

    GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings
    LLaMA: RoPE (rope_theta), RMSNorm, SwiGLU, no biases, grouped-query attention, untied head (by default)

Names: tok_emb, pos_emb (gpt2), blocks[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc, mlp.proj}, norm_f,
lm_head. attn.qkv fuses q, k, v and LLaMA's mlp.fc fuses gate and up (gate first): one matmul instead of
three (two), which matters most in a decoding step, where every kernel launch counts.
"""
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import requests
import sentencepiece
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


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

    @classmethod
    def from_hf(cls, d):
        """An HF config.json dict -> ModelConfig. ValueError on anything we would silently get wrong."""
        def need(key):
            if d.get(key) is None:
                raise ValueError(f"{d.get('model_type')} config has no {key!r}")
            return d[key]

        def refuse(key, ok):
            if key in d and d[key] not in ok:
                raise ValueError(f"unsupported {key}={d[key]!r} (supported: {ok})")

        eos = d.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos      # some configs list several; generate stops on one
        if d.get("model_type") == "gpt2":
            refuse("activation_function", ["gelu_new", "gelu_pytorch_tanh"])
            refuse("scale_attn_by_inverse_layer_idx", [False])
            n_embd = need("n_embd")
            return cls(model_type="gpt2", vocab_size=need("vocab_size"), n_layer=need("n_layer"),
                       n_head=need("n_head"), n_kv_head=need("n_head"), n_embd=n_embd,
                       n_inner=d.get("n_inner") or 4 * n_embd, max_seq_len=need("n_positions"),
                       norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       tie_word_embeddings=d.get("tie_word_embeddings", True),
                       bos_id=d.get("bos_token_id"), eos_id=eos)
        if d.get("model_type") == "llama":
            refuse("hidden_act", ["silu"])
            refuse("attention_bias", [False])
            refuse("mlp_bias", [False])
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers 5 | 4 spelling
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"unsupported RoPE scaling {rope!r} (only the default RoPE)")
            n_embd, n_head = need("hidden_size"), need("num_attention_heads")
            if d.get("head_dim") not in (None, n_embd // n_head):
                raise ValueError(f"head_dim={d['head_dim']} != hidden_size / num_attention_heads = {n_embd // n_head}")
            return cls(model_type="llama", vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
                       n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd,
                       n_inner=need("intermediate_size"), max_seq_len=d.get("max_position_embeddings", 2048),
                       norm_eps=d.get("rms_norm_eps", 1e-6),
                       rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                       tie_word_embeddings=d.get("tie_word_embeddings", False),
                       bos_id=d.get("bos_token_id"), eos_id=eos)
        raise ValueError(f"unknown model_type {d.get('model_type')!r} in config (expected 'gpt2' or 'llama')")

    def to_hf(self):
        """-> a config.json dict that transformers loads (GPT2LMHeadModel / LlamaForCausalLM)."""
        common = dict(model_type=self.model_type, vocab_size=self.vocab_size, bos_token_id=self.bos_id,
                      eos_token_id=self.eos_id, tie_word_embeddings=self.tie_word_embeddings)
        if self.model_type == "gpt2":
            return dict(common, architectures=["GPT2LMHeadModel"], n_layer=self.n_layer, n_head=self.n_head,
                        n_embd=self.n_embd, n_inner=self.n_inner, n_positions=self.max_seq_len,
                        layer_norm_epsilon=self.norm_eps, activation_function="gelu_new")
        return dict(common, architectures=["LlamaForCausalLM"], num_hidden_layers=self.n_layer,
                    num_attention_heads=self.n_head, num_key_value_heads=self.n_kv_head,
                    hidden_size=self.n_embd, head_dim=self.n_embd // self.n_head,
                    intermediate_size=self.n_inner, max_position_embeddings=self.max_seq_len,
                    rms_norm_eps=self.norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    rope_theta=self.rope_theta,  # transformers 4 reads this, 5 reads rope_parameters
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})


# ----------------------------------------------------------------------------- layers

class Linear(nn.Linear):
    """nn.Linear with a faster CPU path for the few rows of a decoding step. For those MKL computes x @ W.T on
    one core at a fraction of the memory bandwidth. Cut W into row blocks of about 1 MB (a multiple of the
    thread count) and hand them to one bmm: the threads share the blocks and each small product runs near
    bandwidth. Measured on a 2-core machine, GPT-2 small: a batch-8 decoding step takes ~80 ms, against
    ~105 ms with one block per thread and ~190 ms with F.linear."""

    def forward(self, x):
        rows, threads = x.numel() // x.shape[-1], torch.get_num_threads()
        if x.device.type != "cpu" or rows > 16 or threads == 1:
            return F.linear(x, self.weight, self.bias)
        N, K = self.weight.shape
        nb = max(threads, N * K // 2**18 // threads * threads)              # blocks of ~2**18 weights
        m = N - N % nb                                                       # rows of W that split evenly
        x2 = x.reshape(rows, K)
        blocks = self.weight[:m].view(nb, m // nb, K).transpose(1, 2)     # (nb, K, m / nb)
        y = torch.bmm(x2.expand(nb, rows, K), blocks)                       # (nb, rows, m / nb)
        y = y.transpose(0, 1).reshape(rows, m)
        if m < N:
            y = torch.cat([y, F.linear(x2, self.weight[m:])], dim=1)        # (rows, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], N)


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
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin      # rotate pairs (i, i + hd/2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        bias = cfg.model_type == "gpt2"
        self.qkv = Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=bias)
        self.proj = Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=bias)

    def forward(self, x, rope=None, mask=None, cache=None, start=0):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hd)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # write this step's keys/values, attend over the slots filled so far
            cache[0][:, :, start:start + T] = k
            cache[1][:, :, start:start + T] = v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]  # (B, nkv, start + T, hd)
        # SDPA shares each kv head among n_head / n_kv_head query heads itself (no repeat_interleave copy)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


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
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)                            # SwiGLU


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
    return pos, ((causal & real[:, None, :]) | eye)[:, None]


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.model_type == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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

    def forward(self, idx, return_hidden=False, *, attention_mask=None):
        """idx (B, T) -> logits (B, T, V), or the final-normed hidden states (B, T, C) with return_hidden.
        attention_mask (B, T) 0/1 (optional, left or right padding): positions count real tokens only and
        pad keys are hidden; without it every row is a plain causal sequence."""
        B, T = idx.shape
        self._check_length(T)
        if attention_mask is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # mask None: SDPA's fast causal path
        else:
            pos, mask = positions_and_mask(attention_mask, T)
        x = self.trunk(idx, pos, mask)
        return x if return_hidden else self.lm_head(x)

    def trunk(self, idx, pos, mask=None, caches=None, start=0):
        """idx (B, T), pos (B or 1, T) -> final-normed hidden (B, T, C). With caches (one (k, v) per layer,
        each (B, nkv, S, hd)) the new keys/values go to [start, start + T) and mask is (B, 1, T, start + T)."""
        x = self.tok_emb(idx)                                              # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = rope_cos_sin(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, caches[i] if caches else None, start)
        return self.norm_f(x)

    def _check_length(self, T):  # past the position table, nn.Embedding's IndexError says nothing useful
        if self.pos_emb is not None and T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens is more than the model's {self.config.max_seq_len} positions")

    def save_pretrained(self, path, tokenizer=None):
        return save_pretrained(self, path, tokenizer)  # defined with the other file code, below

    # ------------------------------------------------------------------------- generation

    def _new_cache(self, B, S):
        shape = (B, self.config.n_kv_head, S, self.config.n_embd // self.config.n_head)
        w = self.tok_emb.weight
        # zeros, not empty: unwritten slots are masked, but garbage NaNs would survive 0 * NaN
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in self.blocks]

    def _next_logits(self, idx, pos, mask, caches, start):
        """One cached forward: idx (B, T) into cache slots [start, start + T) -> last position's logits (B, V).
        pos (B, S) and mask (B, 1, S, S) cover the whole sequence; a step reads only the slots filled so far
        (at batch 32 of a small model, reading the cache's empty tail was a third of the attention time)."""
        end = start + idx.shape[1]
        h = self.trunk(idx, pos[:, start:end], mask[:, :, start:end, :end], caches, start)
        return self.lm_head(h[:, -1])

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
        out = idx.new_full((B, max_new_tokens), pad_id)
        if max_new_tokens <= 0:
            return out
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        elif (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("generate needs LEFT-padded prompts: each attention_mask row must be 0..0 1..1")
        S = T + max_new_tokens
        self._check_length(S)
        pos, mask = positions_and_mask(attention_mask, S)                  # (B, S), (B, 1, S, S)
        if num_beams > 1:
            return self._beam_search(idx, pos, mask, max_new_tokens, num_beams, length_penalty, eos_id, pad_id)

        caches = self._new_cache(B, S)
        logits = self._next_logits(idx, pos, mask, caches, 0)   # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for t in range(max_new_tokens):
            tok = sample_next_token(logits, temperature, top_k, top_p, generator).masked_fill(done, pad_id)  # (B,)
            done |= tok == eos_id
            out[:, t] = tok
            # asking "all done?" makes the host wait for the device, so only every 8th step
            if t == max_new_tokens - 1 or (t % 8 == 7 and bool(done.all())):
                break
            c = T + t                                                       # this token's cache slot
            logits = self._next_logits(tok[:, None], pos, mask, caches, c)
        return out

    def _beam_search(self, idx, pos, mask, max_new_tokens, nb, length_penalty, eos_id, pad_id):
        """HF's beam search with early_stopping=False. Per step keep the 2 nb best (beam, token) candidates so
        nb beams stay alive even if some end; an ending candidate (EOS, or the last step) among the top nb
        becomes a finished hypothesis scored logp_sum / n_new ** length_penalty; the nb best finished are
        kept. A row stops once nb are finished and its best live beam, scored at its current length, can't
        beat the worst of them."""
        B, T = idx.shape
        V, N, dev = self.config.vocab_size, max_new_tokens, idx.device
        rows = torch.arange(B, device=dev).repeat_interleave(nb)            # (B nb,) prompt row of each beam
        pos, mask = pos[rows], mask[rows]
        caches = self._new_cache(B * nb, pos.shape[1])
        logits = self._next_logits(idx[rows], pos, mask, caches, 0)   # (B nb, V)

        seqs = idx.new_full((B, nb, N), pad_id)                              # live beams
        scores = torch.full((B, nb), -1e9, device=dev)
        scores[:, 0] = 0.0                                                   # all beams start equal: use one
        fin_seqs, fin_scores = seqs.clone(), torch.full((B, nb), -1e9, device=dev)  # finished, best first
        fin_real = torch.zeros(B, nb, dtype=torch.bool, device=dev)
        can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
        in_top_nb = torch.arange(2 * nb, device=dev) < nb
        offset = torch.arange(B, device=dev)[:, None] * nb
        for t in range(N):
            logp = F.log_softmax(logits.float(), dim=-1).view(B, nb, V) + scores[..., None]
            cand_scores, cand = logp.view(B, nb * V).topk(2 * nb)            # (B, 2 nb), best first
            beam, tok = cand // V, cand % V
            cand_seqs = take(seqs, beam)                                      # (B, 2 nb, N)
            cand_seqs[:, :, t] = tok
            ends = (tok == eos_id) | (t == N - 1)                             # max length ends them all
            # the nb best candidates that didn't end go on
            live = cand_scores + ends.float() * -1e9
            keep = live.topk(nb).indices
            seqs, scores, src = take(cand_seqs, keep), take(live, keep), take(beam, keep)
            # the nb best finished hypotheses so far (candidates that can't count are pushed to -1e9)
            new_real = ends & in_top_nb
            new_scores = cand_scores / (t + 1) ** length_penalty
            new_scores = new_scores + (~can_improve).float() * -1e9 + (~new_real).float() * -1e9
            merged = torch.cat([fin_scores, new_scores], dim=1)
            best = merged.topk(nb).indices
            fin_scores = take(merged, best)
            fin_seqs = take(torch.cat([fin_seqs, cand_seqs], dim=1), best)
            fin_real = take(torch.cat([fin_real, new_real], dim=1), best)
            if t == N - 1:
                break
            worst = torch.where(fin_real, fin_scores.min(dim=1, keepdim=True).values, -1e9)
            can_improve &= (scores[:, :1] / (t + 1) ** length_penalty > worst).any(dim=1, keepdim=True)
            if not bool(can_improve.any()):
                break
            flat = (src + offset).view(-1)                                    # (B nb,) cache row each beam extends
            caches = [(k[flat], v[flat]) for k, v in caches]
            c = T + t
            logits = self._next_logits(seqs[:, :, t].reshape(-1, 1), pos, mask, caches, c)
        return fin_seqs[:, 0]


def take(x, i):
    """x (B, K, ...), i (B, J) -> x[b, i[b, j]] (B, J, ...): pick beams/candidates per row."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], i]


def _retie_after_load(model, incompatible_keys):
    model.tie_weights()
    if model.config.tie_word_embeddings and "lm_head.weight" in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove("lm_head.weight")  # it is tok_emb.weight


def left_pad(prompts, pad_id):
    """Prompts (lists of ids) -> idx (B, T) left-padded and attention_mask (B, T), 0 on padding: generate's input."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask


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


# ----------------------------------------------------------------------------- HF state dicts

def _hf_layout(cfg):
    """[(our name, [HF names])] for every tensor: the one table both conversions read. Several HF names
    are concatenated (dim 0) into our fused weight, in order."""
    L = []
    if cfg.model_type == "gpt2":
        L += [("tok_emb.weight", ["transformer.wte.weight"]), ("pos_emb.weight", ["transformer.wpe.weight"])]
        pairs = [("norm1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                 ("norm2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")]
        for i in range(cfg.n_layer):
            L += [(f"blocks.{i}.{o}.{w}", [f"transformer.h.{i}.{h}.{w}"]) for o, h in pairs for w in ("weight", "bias")]
        L += [("norm_f.weight", ["transformer.ln_f.weight"]), ("norm_f.bias", ["transformer.ln_f.bias"])]
    else:
        L += [("tok_emb.weight", ["model.embed_tokens.weight"])]
        for i in range(cfg.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            L += [(o + "norm1.weight", [h + "input_layernorm.weight"]),
                  (o + "attn.qkv.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"]),
                  (o + "attn.proj.weight", [h + "self_attn.o_proj.weight"]),
                  (o + "norm2.weight", [h + "post_attention_layernorm.weight"]),
                  (o + "mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]),
                  (o + "mlp.proj.weight", [h + "mlp.down_proj.weight"])]
        L += [("norm_f.weight", ["model.norm.weight"])]
    if not cfg.tie_word_embeddings:
        L += [("lm_head.weight", ["lm_head.weight"])]
    return L


def _transposed(cfg, name):
    # GPT-2's Conv1D stores linear weights as (in, out); nn.Linear wants (out, in)
    return cfg.model_type == "gpt2" and name.startswith("blocks.") and name.endswith("weight") and "norm" not in name


def to_hf_state_dict(model):
    """Our model -> {HF name: tensor}, what transformers' GPT2LMHeadModel / LlamaForCausalLM hold
    (a tied lm_head is left out, as HF's save_pretrained does)."""
    cfg, sd, out = model.config, model.state_dict(), {}
    hd = cfg.n_embd // cfg.n_head
    for ours, hf in _hf_layout(cfg):
        t = sd[ours].t() if _transposed(cfg, ours) else sd[ours]
        if len(hf) == 3:
            parts = t.split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd])
        else:
            parts = t.chunk(len(hf))
        out.update((name, part.contiguous()) for name, part in zip(hf, parts))
    return out


def from_hf_state_dict(sd, config):
    """{HF name: tensor} (GPT2LMHeadModel / LlamaForCausalLM, with or without GPT-2's 'transformer.' prefix)
    -> our state dict, for model.load_state_dict(..., assign=True). Checks every name and shape against
    the config first: ValueError naming the tensor, expected and got shapes."""
    cfg = config
    norm = {}
    for k, v in sd.items():
        if cfg.model_type == "gpt2" and not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k                        # the original GPT-2 checkpoints have no prefix
        if k.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
            continue                                      # buffers old checkpoints saved: causal masks, RoPE
        norm[k] = v
    with torch.device("meta"):
        expected = to_hf_state_dict(Transformer(cfg))     # HF names -> shapes, no memory used
    missing = [k for k in expected if k not in norm]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing for this {cfg.model_type} config, e.g. {missing[:3]}")
    extra = [k for k in norm if k not in expected and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise ValueError(f"{len(extra)} unexpected tensors for this {cfg.model_type} config, e.g. {extra[:3]}")
    for k, e in expected.items():
        if norm[k].shape != e.shape:
            raise ValueError(f"tensor {k!r}: expected shape {tuple(e.shape)} from the config, "
                             f"got {tuple(norm[k].shape)}")
    out = {}
    for ours, hf in _hf_layout(cfg):
        t = torch.cat([norm[n] for n in hf]) if len(hf) > 1 else norm[hf[0]]
        out[ours] = t.t().contiguous() if _transposed(cfg, ours) else t
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


# ----------------------------------------------------------------------------- files: weights, hub, tokenizers
# Everything that touches disk or network. HF folder layout in, HF folder layout out, so a checkpoint
# saved here loads with transformers.AutoModelForCausalLM.from_pretrained and vice versa.
# ----------------------------------------------------------------------------- safetensors
# Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}}
# (plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _safetensors_header(path):
    """Read and validate the header -> (data start, {name: (dtype, shape, begin, end)}). Only ValueError."""
    def bad(problem):
        return ValueError(f"{path}: invalid safetensors file: {problem}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"truncated ({size} bytes, shorter than the 8-byte header length)")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise bad(f"header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, entries, spans = size - 8 - n, {}, []
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)):
            raise bad(f"tensor {name!r}: entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise bad(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: bad shape {shape}")
        if not (len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {name!r}: data_offsets {offsets} out of range (data is {data_size} bytes)")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes but shape {shape} of {info['dtype']} "
                      f"needs {math.prod(shape) * dtype.itemsize}")
        entries[name] = (dtype, shape, *offsets)
        spans.append((*offsets, name))
    spans = sorted(s for s in spans if s[0] < s[1])  # empty tensors occupy no bytes
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    return 8 + n, entries


def read_safetensors(path):
    """{name: tensor} backed by a copy-on-write memory map: nothing is read until used, and the caller
    may modify the tensors without touching the file. ValueError naming the file for any defect."""
    start, entries = _safetensors_header(path)
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))  # (file bytes,)
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        t = data[start + begin:start + end]
        if (start + begin) % dtype.itemsize:  # a foreign writer left it unaligned: view() needs a copy
            t = t.clone()
        out[name] = t.view(dtype).view(shape)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors, laid out like the reference writer (which reads it back)."""
    # widest dtypes first, then by name: every tensor starts at a multiple of its own itemsize
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for k in names:
        t = tensors[k]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {k!r} has dtype {t.dtype}, which safetensors can't hold")
        header[k] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference pads the header with spaces to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k in names:  # one tensor at a time to the CPU: never a second copy of the whole model
            f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------- loading an HF folder
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json",  # in order of preference
                "pytorch_model.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = ["tokenizer.model", "vocab.json", "merges.txt"]
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _read_weight_file(path):
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:  # weights_only: a checkpoint is data, never code; mmap needs the zip format, old files fall back
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors all mean the same thing: a bad file
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise ValueError(f"{path}: not a dict of tensors")
    return sd


def read_hf_weights(folder):
    """-> ({HF name: tensor}, the file that lists them) from any of the four layouts, safetensors first."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path), path
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid weights index ({type(e).__name__}: {e})") from None
        sd = {}
        for shard in shards:
            shard_path = os.path.join(folder, str(shard))
            if not os.path.isfile(shard_path):
                raise ValueError(f"{path}: shard {shard} is missing")
            sd.update(_read_weight_file(shard_path))
        return sd, path
    raise ValueError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def load(path, device="cpu", dtype=None):
    """A local HF folder or a hub name ("gpt2-xl", "openlm-research/open_llama_3b") -> (model, tokenizer).
    tokenizer is None when the folder has no tokenizer files. dtype None = the checkpoint's torch_dtype.
    The model is built on the meta device and takes the memory-mapped tensors as they are: one copy."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else hub_download(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: no config.json (not an HF model folder)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
        config = ModelConfig.from_hf(hf)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path}: {type(e).__name__}: {e}") from None
    if dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"  # transformers 4 | 5 spelling
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{config_path}: unknown torch_dtype {name!r}")
    sd, where = read_hf_weights(folder)
    try:  # checks every name and shape against the config before converting
        sd = from_hf_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if config.tie_word_embeddings:
        del sd["lm_head.weight"]  # it is tok_emb.weight: convert it once, the model re-ties it on load
    for k, v in sd.items():  # one tensor at a time, so a dtype change never holds two whole models
        sd[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(sd, assign=True)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, t)) for t in TOKENIZER_FILES)
    return model.eval(), load_tokenizer(folder) if has_tokenizer else None


# ----------------------------------------------------------------------------- saving an HF folder
def save_pretrained(model, dir, tokenizer=None, max_shard_bytes=5 * 2**30):
    """config.json + model.safetensors (or shards + model.safetensors.index.json past max_shard_bytes)
    + tokenizer files, which transformers.AutoModelForCausalLM.from_pretrained(dir) loads. Atomic: written
    into a temp folder beside dir, then renamed over it (an existing dir is replaced as a whole)."""
    config, sd = model.config, to_hf_state_dict(model)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # as HF does: the head is the embedding, re-tied on load
    hf = config.to_hf()
    hf.setdefault("torch_dtype", str(next(model.parameters()).dtype).removeprefix("torch."))
    hf.setdefault("architectures", [ARCHITECTURES[config.model_type]])
    dir = os.path.abspath(dir)
    os.makedirs(os.path.dirname(dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dir)}.tmp", dir=os.path.dirname(dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a saved model is not
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        shards, size = [{}], 0  # greedy, in order: a new shard when the next tensor would overflow this one
        for k, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = t, size + nbytes
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), sd, {"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, name), shard, {"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in sd.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if os.path.exists(dir):  # two renames: at every moment one complete copy exists on disk
            os.rename(dir, tmp + ".old")
            os.rename(tmp, dir)
            shutil.rmtree(tmp + ".old")
        else:
            os.rename(tmp, dir)
    except BaseException:
        if os.path.exists(tmp + ".old") and not os.path.exists(dir):
            os.rename(tmp + ".old", dir)  # failed between the two renames: put the old copy back
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- hub downloads
def hub_download(repo):
    """Fetch a hub repo's config, weights (safetensors preferred, sharded too) and tokenizer into the cache
    folder ($NANOCPO_CACHE, default ~/.cache/nanocpo) -> that folder. Cached files are never fetched again."""
    parts = repo.split("/")
    if repo.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise ValueError(f"{repo}: no such folder (and not a hub name like 'gpt2' or 'org/name')")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    folder = os.path.join(os.environ.get("NANOCPO_CACHE", os.path.expanduser("~/.cache/nanocpo")), *parts)

    def fetch(name, optional=False):
        dest = os.path.join(folder, name)
        if not os.path.isfile(dest):
            try:
                download(f"{endpoint}/{repo}/resolve/main/{name}", dest)
            except FileNotFoundError:
                if not optional:
                    raise
                return None
        return dest

    fetch("config.json")
    # layouts already cached first, so a cached sharded model costs no request for model.safetensors
    for name in sorted(WEIGHT_FILES, key=lambda w: not os.path.isfile(os.path.join(folder, w))):
        path = fetch(name, optional=True)
        if path and name.endswith(".index.json"):
            with open(path) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    fetch(shard)
        if path:
            break
    else:
        raise ValueError(f"{endpoint}/{repo}: no weights file ({', '.join(WEIGHT_FILES)})")
    if not any(os.path.isfile(os.path.join(folder, t)) for t in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            fetch(name, optional=True)
    return folder


def download(url, dest_path, retries=5):
    """Stream url into dest_path + ".part", then rename it to dest_path once complete. After an interruption
    the next request asks only for the missing bytes (HTTP Range); a server that ignores Range is read from
    the start. A progress line (bytes, MB/s) goes to stderr. FileNotFoundError naming the URL on 404."""
    part = dest_path + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
    token = os.environ.get("HF_TOKEN")
    for attempt in range(retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must be file offsets, not gzip offsets
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=headers, stream=True, timeout=60) as r:
                if r.status_code == 404:
                    raise FileNotFoundError(f"{url}: 404 Not Found")
                if r.status_code in (401, 403):  # the hub answers 401 for repos that don't exist, too
                    raise PermissionError(f"{url}: {r.status_code}: no such repo, or it needs HF_TOKEN")
                if r.status_code == 416:  # our .part does not fit the file (it changed?): start over
                    os.remove(part)
                    continue
                r.raise_for_status()
                if r.status_code != 206:
                    have = 0  # the server ignored Range and sends everything
                total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                _stream_to(part, r, have, total)
            if total is None or os.path.getsize(part) == total:
                os.replace(part, dest_path)
                return dest_path
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries:
                raise
            print(f"\n{url}: {type(e).__name__}, resuming", file=sys.stderr)
            time.sleep(attempt)
    raise OSError(f"{url}: download still incomplete after {retries + 1} attempts")


def _stream_to(part, response, have, total):
    t0 = last = time.time()
    got = 0
    with open(part, "ab" if have else "wb") as f:
        try:
            for chunk in response.iter_content(1 << 16):  # small: a cut connection loses < 64 KiB
                f.write(chunk)
                got += len(chunk)
                if time.time() - last > 0.5 or got + have == total:
                    last = time.time()
                    size = f"/{total / 1e6:.1f}" if total else ""
                    print(f"\r{os.path.basename(part[:-5])}: {(have + got) / 1e6:.1f}{size} MB, "
                          f"{got / 1e6 / max(last - t0, 1e-6):.1f} MB/s", end="", file=sys.stderr, flush=True)
        finally:
            print(file=sys.stderr)


# ----------------------------------------------------------------------------- tokenizers
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable char map: vocab.json and merges.txt spell every token in these chars."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, bs + [256 + i for i in range(len(extra))])))


class Tokenizer:
    """A tokenizer is its files: {"vocab.json", "merges.txt"} (GPT-2 byte-level BPE, run by tiktoken) or
    {"tokenizer.model"} (sentencepiece, LLaMA). encode() never adds BOS or EOS: the data pipeline adds them,
    exactly once. GPT-2: a special string such as "<|endoftext|>" inside text is encoded as ordinary text
    (transformers would turn it into EOS), so data can't forge an end of sequence. LLaMA: ids are exactly
    sentencepiece's, whose dummy prefix "▁" comes even before a leading space (transformers 5 drops it there)."""

    def __init__(self, files):
        self.files = files
        if "tokenizer.model" in files:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
            self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
            return
        self.sp = None
        vocab = json.loads(files["vocab.json"])
        merges = [m.split() for m in files["merges.txt"].decode().splitlines() if m and not m.startswith("#version")]
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        as_bytes = lambda tok: bytes(byte_of[c] for c in tok) if all(c in byte_of for c in tok) else tok.encode()
        id_of = {as_bytes(tok): i for tok, i in vocab.items()}
        # tiktoken merges by rank, so ranks follow merges.txt; ids still come from vocab.json, via rank_to_id
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in merges:
            ranks.setdefault(as_bytes(a + b), len(ranks))
        missing = [tok for tok in ranks if tok not in id_of]
        if missing:
            raise ValueError(f"vocab.json lacks {len(missing)} tokens that merges.txt makes, e.g. {missing[0]!r}")
        self.rank_to_id = [id_of[tok] for tok in ranks]
        self.id_to_bytes = {i: tok for tok, i in id_of.items()}
        self.enc = tiktoken.Encoding("gpt2-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self.vocab_size = max(vocab.values()) + 1
        self.bos_id, self.eos_id = None, vocab.get("<|endoftext|>")
        self.pad_id = self.eos_id

    def encode(self, text):
        if self.sp is not None:
            return self.sp.encode(text)
        return [self.rank_to_id[r] for r in self.enc.encode_ordinary(text)]

    def decode(self, ids):
        if self.sp is not None:
            return self.sp.decode([int(i) for i in ids])
        return b"".join(self.id_to_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def save(self, dir):
        os.makedirs(dir, exist_ok=True)
        for name, data in self.files.items():
            with open(os.path.join(dir, name), "wb") as f:
                f.write(data)


def load_tokenizer(dir):
    """tokenizer.model (sentencepiece) or vocab.json + merges.txt (GPT-2 BPE) from a folder."""
    for names in (["tokenizer.model"], ["vocab.json", "merges.txt"]):
        if all(os.path.isfile(os.path.join(dir, n)) for n in names):
            files = {}
            for n in names:
                with open(os.path.join(dir, n), "rb") as f:
                    files[n] = f.read()
            try:
                return Tokenizer(files)
            except Exception as e:  # json, utf-8, sentencepiece and tiktoken each fail their own way
                raise ValueError(f"{dir}: bad {' + '.join(names)} ({type(e).__name__}: {e})") from None
    raise ValueError(f"{dir}: no tokenizer files (tokenizer.model, or vocab.json + merges.txt)")


def byte_tokenizer():
    """GPT-2-format byte-level BPE with no merges: id b is byte b, 256 is <|endoftext|> (EOS and pad), no BOS."""
    vocab = {c: b for b, c in bytes_to_unicode().items()} | {"<|endoftext|>": 256}
    return Tokenizer({"vocab.json": json.dumps(vocab, ensure_ascii=False).encode(), "merges.txt": b"#version: 0.2\n"})
