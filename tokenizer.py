"""
The tokenizers: GPT-2's byte-level BPE (vocab.json + merges.txt, run by tiktoken) and LLaMA's sentencepiece
(tokenizer.model), each read from an HF folder's files; and byte_tokenizer, the 257-id tokenizer of the CPU
experiments.
"""
import json
import os

import sentencepiece
import tiktoken

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
            self.own_pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
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
        self.own_pad_id = None  # GPT-2 has no pad token

    @property
    def pad_id(self):
        """The id that pads a batch: the tokenizer's own pad token, else EOS, else 0 (padding is masked out)."""
        return next((i for i in (self.own_pad_id, self.eos_id) if i is not None), 0)

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
