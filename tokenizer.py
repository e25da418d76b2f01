"""
The tokenizers, each read from an HF folder's files: byte-level BPE (tokenizer.json, or GPT-2's vocab.json +
merges.txt), run by tiktoken; LLaMA's sentencepiece (tokenizer.model); and byte_tokenizer, the 257-id
tokenizer of the CPU experiments. BOS, EOS and PAD come from the folder's own files (special_ids).
"""
import json
import os
import re
import unicodedata

import sentencepiece
import tiktoken

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then GPT-2's regex, as one pattern: every numeric char alone, and a run of
# spaces before one ends there, as it would at the end of a Digits piece
DIGITS_THEN_GPT2 = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# in order of preference
TOKENIZER_KINDS = [["tokenizer.model"], ["tokenizer.json"], ["vocab.json", "merges.txt"]]
# carried along with the tokenizer: its special tokens, chat template and generation settings
COMPANION_FILES = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json"]


def bytes_to_unicode():
    """GPT-2's byte -> printable char map: vocab.json and merges.txt spell every token in these chars."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, bs + [256 + i for i in range(len(extra))])))


# ----------------------------------------------------------------------------- reading tokenizer.json
def merge_pairs(merges):
    """merges as [("a", "b")]: tokenizer.json spells each one "a b" (older) or ["a", "b"] (newer)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def token_bytes(token, byte_of):
    """A token as vocab.json spells it -> its bytes, through byte_of (bytes_to_unicode reversed);
    a token with a char outside that map is taken as UTF-8 text."""
    if all(c in byte_of for c in token):
        return bytes(byte_of[c] for c in token)
    return token.encode()


def merges_txt(data):
    """merges.txt's merges, ["a", "b"] from each "a b" line; its "#version" line and blank lines skipped."""
    lines = data.decode().splitlines()
    return [m.split() for m in lines if m and not m.startswith("#version")]


def split_pattern(pre):
    """tokenizer.json's pre_tokenizer -> (the regex that splits text before BPE, add_prefix_space).
    ValueError for pre-tokenizers this file can't turn into one regex."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel":
        own_regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and own_regex:
            return GPT2_PATTERN, last.get("add_prefix_space", False)
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and own_regex:
            return DIGITS_THEN_GPT2, last.get("add_prefix_space", False)
        split = steps[0]
        if (kinds == ["Split", "ByteLevel"] and not own_regex and "Regex" in split.get("pattern", {})
                and split.get("behavior") == "Isolated" and not split.get("invert")):
            return split["pattern"]["Regex"], last.get("add_prefix_space", False)
    raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre)[:300]} (supported: ByteLevel; "
                     "Digits(individual) + ByteLevel; Split(Regex, Isolated) + ByteLevel(use_regex=false))")


def normalizer_of(spec):
    """tokenizer.json's normalizer -> a function of the text
    (only unicode normal forms, alone or in a Sequence)."""
    steps = spec.get("normalizers", []) if spec and spec.get("type") == "Sequence" else [spec] if spec else []
    forms = [s.get("type") for s in steps]
    if not all(f in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
        raise ValueError(f"unsupported normalizer {json.dumps(spec)[:300]} (supported: NFC, NFD, NFKC, NFKD)")
    def normalize(text):
        for form in forms:
            text = unicodedata.normalize(form, text)
        return text
    return normalize


def read_tokenizer_json(data):
    """tokenizer.json -> (vocab {str: id}, merges [(a, b)], pattern, add_prefix_space, normalize, added
    {content: (id, special)}, ids the post-processor puts first). Byte-level BPE only."""
    tj = json.loads(data)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"model type {model.get('type')!r} is not supported (only byte-level BPE here; "
                         "a Unigram/sentencepiece model needs its tokenizer.model)")
    decoder = tj.get("decoder") or {}
    if model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ValueError(f"BPE with decoder {decoder.get('type')!r} is not byte-level "
                         "(a sentencepiece-style BPE needs its tokenizer.model)")
    pattern, add_prefix_space = split_pattern(tj.get("pre_tokenizer"))
    added = {t["content"]: (t["id"], t.get("special", False)) for t in tj.get("added_tokens") or []}
    post = tj.get("post_processor") or {}
    first = [p["SpecialToken"]["id"] for p in post.get("single", [])[:1] if "SpecialToken" in p]
    prefix = []
    if post.get("type") == "TemplateProcessing":
        prefix = [post["special_tokens"][t]["ids"][0] for t in first]
    return (model["vocab"], merge_pairs(model.get("merges", [])), pattern, add_prefix_space,
            normalizer_of(tj.get("normalizer")), added, prefix)


# ----------------------------------------------------------------------------- special ids
def token_text(t):
    """tokenizer_config.json spells a special token "<s>" or {"content": "<s>", ...}."""
    return t.get("content") if isinstance(t, dict) else t


def special_ids(files, config, id_of, defaults):
    """{"bos", "eos", "pad"} -> id or None. Precedence, one rule for all three: tokenizer_config.json (then
    special_tokens_map.json) decides when it names the token (its text, looked up in the vocabulary; an
    explicit null means none), else generation_config.json, else config.json (their *_token_id; a list
    of EOS ids gives its first), else the tokenizer file's own default. transformers' tokenizer reads the
    first; generate() stops on generation_config's EOS: save_pretrained makes them agree."""
    sources = [json.loads(files[n]) for n in ("tokenizer_config.json", "special_tokens_map.json")
               if n in files]
    id_sources = []
    if "generation_config.json" in files:
        id_sources.append(json.loads(files["generation_config.json"]))
    id_sources += [config or {}]
    out = {}
    for name in ("bos", "eos", "pad"):
        out[name] = defaults.get(name)
        named = [s[f"{name}_token"] for s in sources if f"{name}_token" in s]
        numbered = [s[f"{name}_token_id"] for s in id_sources if s.get(f"{name}_token_id") is not None]
        if named:
            text = token_text(named[0])
            if text is not None and text not in id_of:
                raise ValueError(f"tokenizer_config.json: {name}_token {text!r} is not in the vocabulary")
            out[name] = None if text is None else id_of[text]
        elif numbered:
            out[name] = numbered[0][0] if isinstance(numbered[0], list) else numbered[0]
    return out


# ----------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    """A tokenizer is its files: {"tokenizer.json"} or {"vocab.json", "merges.txt"} (byte-level BPE, run by
    tiktoken) or {"tokenizer.model"} (sentencepiece, LLaMA), plus the COMPANION_FILES it came with.
    encode() never adds BOS or EOS: the data pipeline adds them, exactly once (bos_id is None when the
    tokenizer's own post-processor adds no BOS). Special and added tokens: a special token's text inside
    the text encodes as ordinary text unless listed in allowed_special, so data can't forge an end of
    sequence (transformers would encode it as the token; a prompt template that declares its special
    tokens passes allowed_special); non-special added tokens always encode as themselves, as in
    transformers. LLaMA: ids are exactly sentencepiece's, whose dummy prefix "▁" comes even before a
    leading space (transformers 5 drops it there)."""

    def __init__(self, files, config=None):
        self.files, self.config = files, config or {}
        if "tokenizer.model" in files:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
            self.vocab_size = self.sp.get_piece_size()
            id_of = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
            own = {"bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": self.sp.pad_id()}
            self.specials = special_ids(files, config, id_of, {k: v for k, v in own.items() if v >= 0})
            self.added, add_bos = {}, True
        else:
            self.sp = None
            if "tokenizer.json" in files:
                tokenizer_json = read_tokenizer_json(files["tokenizer.json"])
                vocab, merges, pattern, prefix_space, normalize, added, prefix = tokenizer_json
            else:
                vocab = json.loads(files["vocab.json"])
                merges = [tuple(m) for m in merges_txt(files["merges.txt"])]
                pattern, prefix_space, normalize, prefix = GPT2_PATTERN, False, (lambda s: s), []
                added = {"<|endoftext|>": (vocab["<|endoftext|>"], True)} if "<|endoftext|>" in vocab else {}
            self._init_bpe(vocab, merges, pattern, added)
            self.add_prefix_space, self.normalize = prefix_space, normalize
            id_of = {**vocab, **{t: i for t, (i, _) in added.items()}}
            self.specials = special_ids(files, config, id_of, {"eos": vocab.get("<|endoftext|>")})
            add_bos = bool(prefix)
        tc = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
        add_bos = tc.get("add_bos_token", add_bos)
        self.bos_id = self.specials["bos"] if add_bos else None  # what the data pipeline puts first
        self.eos_id, self.own_pad_id = self.specials["eos"], self.specials["pad"]

    def _init_bpe(self, vocab, merges, pattern, added):
        """tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE the pair that
        comes first in merges. So rank = merge order: the 256 single bytes, then each merge's result at its
        first appearance. Only tokens merges can make get a rank (HF never produces the others), and a single
        byte the vocabulary lacks keeps a rank without an id: an error only if it occurs in the text."""
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        id_of = {token_bytes(tok, byte_of): i for tok, i in vocab.items()}
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in merges:
            ranks.setdefault(token_bytes(a + b, byte_of), len(ranks))
        missing = [tok for tok in list(ranks)[256:] if tok not in id_of]
        if missing:
            raise ValueError(f"the vocabulary lacks {len(missing)} tokens that the merges make, "
                             f"e.g. {missing[0]!r}")
        self.id_to_bytes = {i: tok for tok, i in id_of.items()}
        self.id_to_bytes |= {i: t.encode() for t, (i, _) in added.items()}
        special_rank = {t: len(ranks) + j for j, t in enumerate(added)}
        self.rank_to_id = [id_of.get(tok) for tok in ranks] + [i for i, _ in added.values()]
        # transformers always matches these
        self.always = {t for t, (_, special) in added.items() if not special}
        self.added = {t: i for t, (i, _) in added.items()}
        self.enc = tiktoken.Encoding("hf-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special_rank)
        self.vocab_size = max([*vocab.values(), *self.added.values()]) + 1

    @property
    def pad_id(self):
        """The id that pads a batch: the tokenizer's own pad token, else EOS, else 0
        (padding is masked out)."""
        return next((i for i in (self.own_pad_id, self.eos_id) if i is not None), 0)

    def encode(self, text, allowed_special=()):
        """text -> ids, no BOS/EOS added. allowed_special: special tokens' texts that may encode as the
        token ("all": every added token)."""
        allowed = set(self.added) if allowed_special == "all" else set(allowed_special)
        if self.sp is not None:
            return self._sp_encode(text, allowed)
        text = self.normalize(text)
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text  # what transformers' ByteLevel(add_prefix_space) does
        ranks = self.enc.encode(text, allowed_special=allowed | self.always, disallowed_special=())
        ids = [self.rank_to_id[r] for r in ranks]
        if None in ids:
            lacking = sorted({b for b in text.encode() if self.rank_to_id[b] is None})
            raise ValueError(f"text {text[:60]!r} has bytes {[hex(b) for b in lacking]} "
                             "that the vocabulary lacks")
        return ids

    def _sp_encode(self, text, allowed):
        """sentencepiece, each allowed special token's text cut out first and encoded as its id."""
        if not allowed:
            return self.sp.encode(text)
        parts = re.split("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")", text)
        ids = []
        for j, part in enumerate(parts):  # odd parts are the special tokens' texts
            ids += [self.sp.piece_to_id(part)] if j % 2 else self.sp.encode(part) if part else []
        return ids

    def decode(self, ids):
        if self.sp is not None:
            return self.sp.decode([int(i) for i in ids])
        return b"".join(self.id_to_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def save(self, dir):
        """The files it was read from, and what transformers' AutoTokenizer needs beside them: a
        tokenizer.json (and tokenizer_config.json naming the special tokens) when it came as vocab.json +
        merges.txt, which transformers reads only for GPT-2 models."""
        os.makedirs(dir, exist_ok=True)
        files = dict(self.files)
        if "vocab.json" in files and "tokenizer.json" not in files:
            files["tokenizer.json"] = self.tokenizer_json()
        if "tokenizer_config.json" not in files:
            files["tokenizer_config.json"] = json.dumps(self.tokenizer_config(), indent=2).encode()
        for name, data in files.items():
            with open(os.path.join(dir, name), "wb") as f:
                f.write(data)

    def token(self, i):
        """An id's text, as transformers names special tokens; None for None."""
        if i is None:
            return None
        if self.sp is not None:
            return self.sp.id_to_piece(i)
        added = next((t for t, j in self.added.items() if j == i), None)
        if added:
            return added
        byte_char = bytes_to_unicode()
        return "".join(byte_char[b] for b in self.id_to_bytes[i])

    def tokenizer_config(self):
        names = {f"{k}_token": self.token(v) for k, v in self.specials.items() if v is not None}
        return {**names, "add_bos_token": self.bos_id is not None, "model_max_length": 1 << 30,
                **({"tokenizer_class": "LlamaTokenizer"} if self.sp is not None else {})}

    def tokenizer_json(self):
        """vocab.json + merges.txt (+ <|endoftext|>) as the tokenizer.json transformers writes for them."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": t not in self.always} for t, i in self.added.items()]
        merges = merges_txt(self.files["merges.txt"])
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": False, "vocab": json.loads(self.files["vocab.json"]), "merges": merges}
        return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                           "normalizer": None, "pre_tokenizer": dict(byte_level),
                           "post_processor": dict(byte_level), "decoder": dict(byte_level),
                           "model": model}, ensure_ascii=False).encode()


def read_folder_files(dir, names):
    files = {}
    for n in names:
        if os.path.isfile(os.path.join(dir, n)):
            with open(os.path.join(dir, n), "rb") as f:
                files[n] = f.read()
    return files


def load_tokenizer(dir):
    """The folder's tokenizer: tokenizer.model (sentencepiece), else tokenizer.json (byte-level BPE), else
    vocab.json + merges.txt (GPT-2 BPE), with its special ids from the folder (special_ids). ValueError
    naming the file when it has one we can't read, or naming the folder when it has none of these."""
    config = read_folder_files(dir, ["config.json"]).get("config.json")
    companions = read_folder_files(dir, COMPANION_FILES)
    for names in TOKENIZER_KINDS:
        if all(os.path.isfile(os.path.join(dir, n)) for n in names):
            try:
                files = {**read_folder_files(dir, names), **companions}
                return Tokenizer(files, json.loads(config) if config else None)
            except Exception as e:  # json, utf-8, sentencepiece and tiktoken each fail their own way
                raise ValueError(f"{os.path.join(dir, names[0])}: cannot use {' + '.join(names)} "
                                 f"({type(e).__name__}: {e})") from None
    raise ValueError(f"{dir}: no tokenizer we can read (tokenizer.model, tokenizer.json with byte-level BPE, "
                     "or vocab.json + merges.txt)")


def byte_tokenizer():
    """GPT-2-format byte-level BPE with no merges: id b is byte b, 256 is <|endoftext|> (EOS and pad),
    no BOS."""
    vocab = {c: b for b, c in bytes_to_unicode().items()} | {"<|endoftext|>": 256}
    return Tokenizer({"vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
                      "merges.txt": b"#version: 0.2\n"})
