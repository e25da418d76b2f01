"""
The HF format, in and out: config.json <-> ModelConfig, HF state dicts <-> ours, safetensors files, and
whole folders (`load`, `save_pretrained`), from disk or the hub. A folder saved here loads with
transformers.AutoModelForCausalLM.from_pretrained, and one saved by transformers loads here.
"""
import json
import math
import os

import numpy as np
import torch

from common import cache_dir, download, hub_endpoint, inside, write_folder_atomic
from model import ModelConfig, Transformer
from tokenizer import COMPANION_FILES, load_tokenizer

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


# ----------------------------------------------------------------------------- config.json
COUNT_KEYS = ["vocab_size", "n_layer", "n_head", "n_embd", "n_inner", "n_positions", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim", "intermediate_size",
              "max_position_embeddings"]  # sizes and counts: integers >= 1
EPS_KEYS = ["layer_norm_epsilon", "rms_norm_eps", "rope_theta"]  # numbers > 0


def check_config_values(d):
    """ValueError naming the key for a value that would crash or mislead later (n_head 0 dividing by zero,
    "12" or 12.0 where a count belongs), before ModelConfig does arithmetic with it."""
    for key in COUNT_KEYS:
        if d.get(key) is not None and not (type(d[key]) is int and d[key] >= 1):
            raise ValueError(f"{key} must be an integer >= 1, got {d[key]!r}")
    for key in EPS_KEYS:
        value = d.get(key)
        if value is None:
            continue
        if not (type(value) in (int, float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a number > 0, got {d[key]!r}")
    for key in ("bos_token_id", "eos_token_id"):
        ids = d.get(key) if isinstance(d.get(key), list) else [d.get(key)]
        if not ids or not all(i is None or (type(i) is int and i >= 0) for i in ids):
            raise ValueError(f"{key} must be a token id (an integer >= 0) or null, got {d.get(key)!r}")


def config_from_hf(d):
    """An HF config.json dict -> ModelConfig. ValueError on anything we would silently get wrong."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    check_config_values(d)
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
        return ModelConfig(model_type="gpt2", vocab_size=need("vocab_size"), n_layer=need("n_layer"),
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
            raise ValueError(f"head_dim={d['head_dim']} != "
                             f"hidden_size / num_attention_heads = {n_embd // n_head}")
        return ModelConfig(model_type="llama", vocab_size=need("vocab_size"),
                           n_layer=need("num_hidden_layers"),
                           n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd,
                           n_inner=need("intermediate_size"),
                           max_seq_len=d.get("max_position_embeddings", 2048),
                           norm_eps=d.get("rms_norm_eps", 1e-6),
                           rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                           tie_word_embeddings=d.get("tie_word_embeddings", False),
                           bos_id=d.get("bos_token_id"), eos_id=eos)
    raise ValueError(f"unknown model_type {d.get('model_type')!r} in config (expected 'gpt2' or 'llama')")


def config_to_hf(cfg):
    """-> a config.json dict that transformers loads (GPT2LMHeadModel / LlamaForCausalLM)."""
    both = dict(model_type=cfg.model_type, vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_id,
                eos_token_id=cfg.eos_id, tie_word_embeddings=cfg.tie_word_embeddings,
                architectures=[ARCHITECTURES[cfg.model_type]])
    if cfg.model_type == "gpt2":
        return dict(both, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_embd=cfg.n_embd, n_inner=cfg.n_inner, n_positions=cfg.max_seq_len,
                    layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new")
    return dict(both, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                hidden_size=cfg.n_embd, head_dim=cfg.head_dim,
                intermediate_size=cfg.n_inner, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
                rope_theta=cfg.rope_theta,  # transformers 4 reads this, 5 reads rope_parameters
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


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
            for o, h in pairs:
                for w in ("weight", "bias"):
                    L.append((f"blocks.{i}.{o}.{w}", [f"transformer.h.{i}.{h}.{w}"]))
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
    in_blocks = name.startswith("blocks.") and name.endswith("weight") and "norm" not in name
    return cfg.model_type == "gpt2" and in_blocks


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
        raise ValueError(f"{len(missing)} tensors missing for this {cfg.model_type} config, "
                         f"e.g. {missing[:3]}")
    tied_head = ["lm_head.weight"] if cfg.tie_word_embeddings else []  # saved by some, ignored
    extra = [k for k in norm if k not in expected and k not in tied_head]
    if extra:
        raise ValueError(f"{len(extra)} unexpected tensors for this {cfg.model_type} config, "
                         f"e.g. {extra[:3]}")
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


# ----------------------------------------------------------------------------- safetensors
# Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}}
# (plus an optional "__metadata__" of strings), then the raw little-endian tensor bytes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
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
            raise bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes "
                      f"but shape {shape} of {info['dtype']} needs {math.prod(shape) * dtype.itemsize}")
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
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"]
# any of these means the folder has a tokenizer: load_tokenizer reads it or says why it can't, never None
TOKENIZER_SIGNS = TOKENIZER_FILES + ["vocab.txt", "spiece.model", "tokenizer_config.json"]


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
            shard_path = inside(folder, str(shard))
            if not os.path.isfile(shard_path):
                raise ValueError(f"{path}: shard {shard} is missing")
            sd.update(_read_weight_file(shard_path))
        return sd, path
    raise ValueError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


RUN_FILE = "nanocpo.json"  # train.py writes it into final/: {"max_len": the length of its training windows}


def window_len(folder, net, max_len=None):
    """The one length rule for prompt + continuation windows (data.load_task's max_len), shared by training,
    evaluate.py generate and the AN tool: an explicit max_len, else the max_len the model was trained with
    (RUN_FILE in its folder), else the model's context."""
    path = os.path.join(os.fspath(folder), RUN_FILE)
    if max_len is None and os.path.isfile(path):
        with open(path) as f:
            max_len = json.load(f)["max_len"]
    return max_len or net.config.max_seq_len


def load(path, device="cpu", dtype=None):
    """A local HF folder or a hub name ("gpt2-xl", "openlm-research/open_llama_3b") -> (model, tokenizer).
    tokenizer is None when the folder has no tokenizer files; when it has one, its BOS/EOS
    (tokenizer.special_ids) become the model config's. dtype None = the checkpoint's torch_dtype.
    The model is built on the meta device and takes the memory-mapped tensors as they are: one copy."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else hub_download(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: no config.json (not an HF model folder)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
        config = config_from_hf(hf)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path}: {type(e).__name__}: {e}") from None
    if dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"  # transformers 4 | 5 spelling
        dtype = getattr(torch, str(name), None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{config_path}: torch_dtype {name!r} is not a floating-point torch dtype")
    sd, where = read_hf_weights(folder)
    try:  # checks every name and shape against the config before converting
        sd = from_hf_state_dict(sd, config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    # an int or bool tensor would be cast to float below, silently turning into nonsense
    for k, v in sd.items():
        if not v.is_floating_point():
            raise ValueError(f"{where}: tensor {k!r} has dtype {v.dtype}; weights must be floating point")
    if config.tie_word_embeddings:
        del sd["lm_head.weight"]  # it is tok_emb.weight: convert it once, the model re-ties it on load
    for k, v in sd.items():  # one tensor at a time, so a dtype change never holds two whole models
        sd[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, t)) for t in TOKENIZER_SIGNS)
    tok = load_tokenizer(folder) if has_tokenizer else None
    if tok is not None:  # the folder's special ids by tokenizer.special_ids' one rule, for generate() too
        config.bos_id, config.eos_id = tok.specials["bos"], tok.eos_id
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(sd, assign=True)
    return model.eval(), tok


# ----------------------------------------------------------------------------- saving an HF folder
def save_pretrained(model, dir, tokenizer=None, max_shard_bytes=5 * 2**30):
    """config.json + model.safetensors (or shards + model.safetensors.index.json past max_shard_bytes)
    + tokenizer files, which transformers.AutoModelForCausalLM.from_pretrained(dir) loads. Atomic: an
    existing dir is replaced as a whole (common.write_folder_atomic)."""
    config, sd = model.config, to_hf_state_dict(model)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # as HF does: the head is the embedding, re-tied on load
    hf = dict(config_to_hf(config), torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    if tokenizer is not None:
        hf.update(special_token_ids(tokenizer))
    shards, size = [{}], 0  # greedy, in order: a new shard when the next tensor would overflow this one
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = t, size + nbytes

    def fill(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
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
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(generation_config(tokenizer), f, indent=2)
    write_folder_atomic(dir, fill)


def special_token_ids(tokenizer):
    """config.json's bos/eos/pad_token_id: the tokenizer's,
    so config, generation config and tokenizer agree."""
    return {f"{k}_token_id": v for k, v in tokenizer.specials.items()}


def generation_config(tokenizer):
    """The folder's generation_config.json with the tokenizer's special ids. A list of EOS ids that
    holds the tokenizer's EOS stays (generate stops on any of them); else EOS is the tokenizer's."""
    gc = json.loads(tokenizer.files.get("generation_config.json", b"{}"))
    eos = gc.get("eos_token_id")
    keep = isinstance(eos, list) and tokenizer.eos_id in eos
    gc.update(special_token_ids(tokenizer), eos_token_id=eos if keep else tokenizer.eos_id)
    return gc


# ----------------------------------------------------------------------------- hub downloads
def check_hub_name(repo):
    """ValueError "no such folder" at once, without a request, for a name that is a mistyped local path
    rather than a hub name ('gpt2', 'org/name'): it starts with '.', '/' or '~', has more than two parts,
    or its first part is a folder here ('out/fianl' when out/ exists)."""
    parts = repo.replace(os.sep, "/").split("/")
    looks_local = (repo.startswith((".", "/", "~")) or "\\" in repo
                   or (len(parts) == 2 and os.path.isdir(parts[0])))
    if looks_local or len(parts) > 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{repo}: no such folder (and not a hub name like 'gpt2' or 'org/name')")


def hub_download(repo):
    """Fetch a hub repo's config, weights (safetensors preferred, sharded too) and tokenizer into the cache
    folder ($NANOCPO_CACHE, default ~/.cache/nanocpo) -> that folder. Cached files are never fetched again."""
    check_hub_name(repo)
    endpoint = hub_endpoint()
    folder = inside(cache_dir(), repo)  # the cache key, too, must stay in the cache

    def fetch(name, optional=False):
        dest = inside(folder, str(name))  # shard names come from the remote: refused before a byte is written
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
        for name in TOKENIZER_FILES + COMPANION_FILES:
            fetch(name, optional=True)
    return folder
