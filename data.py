"""
Data for nanoCPO: every task becomes a list of Examples, each a prompt and a continuation in tokens.

    from data import load_task, collate, global_batch, score_synthetic
    train = load_task("synthetic", "train", tok, max_len=48)                # built-in task, from a seed
    dolly = load_task("dolly", "test", tok, max_len=1024)                   # the paper's 7506 test rows
    wiki  = load_task("wiki:wiki.jsonl", "all", tok, max_len=1024)          # 15% prefix -> 85% continuation
    mine  = load_task("jsonl:https://host/pairs.jsonl", "train", tok, 512)  # {"prompt", "response"[, "id"]}
    input_ids, cont_mask = collate(train[:64], pad_id=tok.pad_id)          # (N, T) Long, (N, T) bool
    indices = global_batch(step, len(train), batch_size=64, seed=0)  # the examples of step `step`, any rank

The sequence convention shared by every file: prompt_ids starts with exactly one BOS iff
tokenizer.bos_id is not None; continuation_ids ends with exactly one EOS. build_example() is the only
place that adds them and the only place that truncates. Every loader prints one line of counts.
"""
import functools
import hashlib
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch

import common
from common import cut_at_eos

DOLLY_URL = ("https://huggingface.co/datasets/databricks/databricks-dolly-15k"
             "/resolve/main/databricks-dolly-15k.jsonl")
SPLIT_SALT = "nanocpo-split-v1"  # part of every train/test split: changing it reshuffles them all
# the paper's Dolly split (also used for wiki: files, the paper's other task)
TRAIN_ROWS, ALL_ROWS = 7505, 15011


@dataclass
class Example:
    id: str
    prompt: str                 # the text as given; prompt_ids may have been cut from the left
    response: str
    prompt_ids: list[int]       # [BOS]? + prompt tokens
    continuation_ids: list[int] # response tokens + [EOS]

# ----------------------------------------------------------------------------- tokens: the one rule

def text_ids(tokenizer, text):
    """encode() without BOS/EOS: drop a BOS the tokenizer itself may prepend (sentencepiece-style) and
    any EOS the text ends with ("...<|endoftext|>"), so that build_example adds exactly one of each."""
    ids = list(tokenizer.encode(text))
    if tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]
    while ids and ids[-1] == tokenizer.eos_id:
        ids.pop()
    return ids


def build_example(id, prompt, response, prompt_body, response_body, tokenizer, max_len, stats):
    """Add BOS and EOS and fit the example into max_len tokens; None if it must be dropped.

    1. Dropped: a response with zero tokens (an empty target, nothing to learn, nothing to truncate
       for negatives), or no prompt token at all (the first continuation token needs a position to
       be predicted from), or max_len < 3 (no room for one prompt token, one response token and EOS).
    2. The continuation is kept whole. Only if it alone would leave no room for one prompt token
       (len > max_len - 1) is it cut to its first max_len - 2 tokens followed by its EOS.
    3. The prompt takes the room left and is cut from the LEFT, because the continuation depends
       most on the prompt's end; BOS, when the family uses one, stays first.
    `stats` (a Counter) counts prompts truncated, continuations truncated and examples dropped.
    """
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if not response_body or not (head or prompt_body) or max_len < 3:
        stats["dropped"] += 1
        return None
    if len(response_body) + 1 > max_len - 1:
        response_body = response_body[:max_len - 2]
        stats["continuations truncated"] += 1
    continuation = response_body + [tokenizer.eos_id]
    prompt_ids, room = head + prompt_body, max_len - len(continuation)  # room >= 1 + len(head)
    if len(prompt_ids) > room:
        prompt_ids = cut_prompt_left(prompt_ids, room, keep_bos=bool(head))
        stats["prompts truncated"] += 1
    return Example(str(id), prompt, response, prompt_ids, continuation)


def cut_prompt_left(ids, room, keep_bos=False):
    """A prompt that fits in `room` tokens: cut from the LEFT, because a continuation depends most on the
    prompt's end. keep_bos: ids[0] is a BOS that stays first (and counts in room).
    Short ones come back whole."""
    if len(ids) <= room:
        return list(ids)
    return list(ids[:1]) * keep_bos + list(ids[len(ids) - room + keep_bos:])


def encode_example(id, prompt, response, tokenizer, max_len, stats=None):
    """Tokenize a (prompt, response) pair into an Example (or None: dropped); see build_example."""
    stats = Counter() if stats is None else stats
    return build_example(id, prompt, response, text_ids(tokenizer, prompt), text_ids(tokenizer, response),
                         tokenizer, max_len, stats)


def report(name, examples, stats):
    """The one line every loader prints, e.g. 'dolly/train: 7505 examples, 12 prompts truncated, ...'."""
    counts = ["prompts truncated", "continuations truncated", "dropped"]
    counts += [k for k in stats if k not in counts]  # loader-specific ones (wiki: "too short", ...)
    print(f"{name}: {len(examples)} examples, " + ", ".join(f"{stats[k]} {k}" for k in counts))

# ----------------------------------------------------------------------------- sources and files

def fetch(source, cache_dir=None):
    """A local path as is; an http(s) URL downloaded once into cache_dir (default common.cache_dir())."""
    url = urlparse(source)
    if url.scheme not in ("http", "https"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no such data file: {source}")
        return source
    cache_dir = cache_dir or common.cache_dir()
    # the URL's hash keeps two files called data.jsonl apart; the basename keeps the extension (wiki reads it)
    dest = common.inside(cache_dir, hashlib.sha256(source.encode()).hexdigest()[:12] + "-" +
                         (os.path.basename(url.path) or "data"))
    if not os.path.isfile(dest):  # download() renames into place at the end: a file that exists is complete
        common.download(source, dest)
    return dest


def read_rows(path, required, optional=(), unique=None):
    """The objects of a JSON-lines file (common.read_jsonl), each field checked to be a string.
    A malformed line is a ValueError naming it: "path:LINE: missing field 'response'". unique: a field
    no two lines may share (an id), a repeat naming both lines."""
    seen = {}

    def check(row, where):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            if key not in row:
                raise ValueError(f"{where}: missing field {key!r}")
        for key in (*required, *optional):
            if key in row and not isinstance(row[key], str):
                got = type(row[key]).__name__
                raise ValueError(f"{where}: field {key!r} must be a string, got {got}")
        if unique in row:
            key = repr(row[unique])  # any JSON value, hashable
            if key in seen:
                raise ValueError(f"{where}: {unique} {row[unique]!r} repeats the one at {seen[key]}")
            seen[key] = where
    return common.read_jsonl(path, check=check)


def split_indices(keys, split, train_fraction=TRAIN_ROWS / ALL_ROWS):
    """Which items (by index, in file order) belong to `split`: "train", "test" or "all".

    Items are ordered by sha256(salt + content key) and the first floor(N * train_fraction) are train:
    by default 7505 / 15011, exactly the paper's 7505 / 7506 for Dolly's 15011 rows.
    Hashing the content (not Python's salted hash(), not random.shuffle) gives the same split on every
    machine and Python version, and whatever the line order; identical rows tie and keep file order.
    """
    if split == "all":
        return list(range(len(keys)))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    def order(i):
        return hashlib.sha256((SPLIT_SALT + keys[i]).encode()).digest(), i
    rank = sorted(range(len(keys)), key=order)
    if train_fraction == TRAIN_ROWS / ALL_ROWS:
        n_train = len(keys) * TRAIN_ROWS // ALL_ROWS  # the paper's split stays integer arithmetic
    else:
        n_train = math.floor(len(keys) * train_fraction + 1e-9)
    return sorted(rank[:n_train] if split == "train" else rank[n_train:])

# ------------------------------------------------------------------------- Dolly, Wikipedia, generic jsonl

def dolly_prompt(instruction, context=""):
    """The one Dolly prompt template (Alpaca-like); the Context section only when the row has context."""
    if context.strip():
        return (f"### Instruction:\n{instruction.strip()}\n\n"
                f"### Context:\n{context.strip()}\n\n### Response:\n")
    return f"### Instruction:\n{instruction.strip()}\n\n### Response:\n"


def dolly_query(instruction, context=""):
    """A Dolly row as a person asks a chatbot, the query the judge sees (the paper's templates): the
    instruction, then its context when it has one, as plain text, without the training template."""
    if context.strip():
        return f"{instruction.strip()}\n\n{context.strip()}"
    return instruction.strip()


def judge_query(prompt):
    """The text the judge is asked about for an Example's prompt: one dolly_prompt wrote becomes the
    dolly_query of its instruction and context; any other prompt (a Wiki prefix, your own jsonl's prompt)
    is returned as it is. Read back from the prompt, so generations files of any age are judged alike."""
    head, tail = "### Instruction:\n", "\n\n### Response:\n"
    if not (prompt.startswith(head) and prompt.endswith(tail)):
        return prompt
    instruction, _, context = prompt[len(head):-len(tail)].partition("\n\n### Context:\n")
    if dolly_prompt(instruction, context) != prompt:  # only the template's own shape is unformatted
        return prompt
    return dolly_query(instruction, context)


def load_dolly(source, tokenizer, split, max_len, cache_dir=None):
    """databricks-dolly-15k rows {"instruction", "context", "response", "category"}; id "dolly-<row>"
    (row = 0-based index among the file's rows, as on the hub). "context" may be absent; the response is
    stripped of surrounding whitespace so that EOS follows its last word."""
    path = fetch(source, cache_dir)
    rows = read_rows(path, ("instruction", "response"), ("context", "category"))
    keys = ["\x1f".join((r["instruction"], r.get("context", ""), r["response"])) for r in rows]
    stats, examples = Counter(), []
    for i in split_indices(keys, split):
        r = rows[i]
        ex = encode_example(f"dolly-{i}", dolly_prompt(r["instruction"], r.get("context", "")),
                            r["response"].strip(), tokenizer, max_len, stats)
        if ex:
            examples.append(ex)
    report(f"dolly/{split}", examples, stats)
    return examples


def read_documents(path):
    """Documents of a .jsonl/.json file ({"text"} or {"title", "text"}; the title is not used) or,
    for any other extension, of a plain text file with one document per non-blank line."""
    if path.endswith((".jsonl", ".json")):
        return [r["text"] for r in read_rows(path, ("text",), ("title",))]
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1} of the line)") from None
            if line.strip():
                docs.append(line)
    return docs


def load_wiki(source, tokenizer, max_len, prefix_fraction=0.15, split="all", cache_dir=None):
    """Open-ended generation: prompt = the first 15% of a document's tokens (at least 1), continuation =
    the rest + EOS. The split is made on token ids, then the prefix is decoded for the prompt text (so no
    re-encoding can move the boundary). A document longer than max_len (less BOS and EOS) is first cut to
    its start, so the 15/85 proportion holds in the window; one under 2 tokens is skipped as too short."""
    path = fetch(source, cache_dir)
    docs = read_documents(path)
    window = max_len - 1 - (tokenizer.bos_id is not None)  # document tokens that fit beside BOS and EOS
    stats, examples = Counter(), []
    for i in split_indices(docs, split):
        ids = text_ids(tokenizer, docs[i])
        if len(ids) > window:
            ids = ids[:window]
            stats["documents cut to max_len"] += 1
        n_prefix = max(1, int(len(ids) * prefix_fraction + 1e-9))  # 1e-9: 0.15 * 20 must be 3, not 2.99..
        if len(ids) - n_prefix < 1:
            stats["too short"] += 1
            continue
        prefix, rest = ids[:n_prefix], ids[n_prefix:]
        ex = build_example(f"wiki-{i}", tokenizer.decode(prefix), tokenizer.decode(rest), prefix, rest,
                           tokenizer, max_len, stats)
        if ex:
            examples.append(ex)
    report(f"wiki/{split}", examples, stats)
    return examples


def load_jsonl(source, tokenizer, max_len, split="all", cache_dir=None, val_fraction=0.0):
    """Generic pairs {"prompt", "response"[, "id"]}, used verbatim; id defaults to "<file>-<row>".
    Your own data: "train" is every row and "test" none, unless val_fraction holds some out (by the
    same content hash as split_indices). The paper's split is Dolly's, not this file's."""
    path = fetch(source, cache_dir)
    rows = read_rows(path, ("prompt", "response"), unique="id")
    name = os.path.splitext(os.path.basename(urlparse(source).path if "://" in source else source))[0]
    keys = [r["prompt"] + "\x1f" + r["response"] for r in rows]
    stats, examples = Counter(), []
    for i in split_indices(keys, split, 1.0 - val_fraction):
        r = rows[i]
        example_id = r.get("id", f"{name}-{i}")
        ex = encode_example(example_id, r["prompt"], r["response"], tokenizer, max_len, stats)
        if ex:
            examples.append(ex)
    report(f"{name}/{split}", examples, stats)
    return examples

def load_rejected(source, examples, tokenizer, max_len, cache_dir=None):
    """DPO's rejected responses, jsonl {"id", "rejected"} as `python evaluate.py dpo-negatives` writes
    it -> {id: Example}: the chosen example's prompt (same ids) with the rejected response after it,
    cut to fit max_len, plus one EOS. Every example needs one; a missing one names the file and id."""
    path = fetch(source, cache_dir)
    rows = read_rows(path, ("id", "rejected"), unique="id")
    rejected = {r["id"]: r["rejected"] for r in rows}
    out = {}
    for e in examples:
        if e.id not in rejected:
            raise ValueError(f"{path}: no rejected response for example {e.id!r}")
        body = text_ids(tokenizer, rejected[e.id])[:max_len - len(e.prompt_ids) - 1]
        if not body:
            raise ValueError(f"{path}: the rejected response for example {e.id!r} is empty"
                             " (or no room after its prompt)")
        out[e.id] = Example(e.id, e.prompt, rejected[e.id], e.prompt_ids, body + [tokenizer.eos_id])
    return out

# ----------------------------------------------------------------------------- the built-in synthetic task
# A string transformation of a random lowercase word: "rev hello=" -> "olleh", "sort hello=" -> "ehllo",
# "dup abc=" -> "aabbcc", "cons hello=" -> "hll" (consonants). Why this task: the answer (1..20 letters)
# is checked exactly; its length depends on the operation and, for "cons", on the content, so the model
# must learn *where* EOS goes; one early wrong letter derails the rest (exposure bias), which is what a
# sequence-level loss targets; and it is learnable but not trivially: a 0.8M-parameter byte-level
# transformer (4 layers, 128 wide) from scratch, batch 64, lr 2e-3, greedy on test words: exact match
# 1% / 16% / 58% and correct stop 72% / 86% / 85% after 250 / 500 / 750 steps (~0.3 CPU-s a step).
# At most 16 + 21 tokens, so CPU training is fast.
SYNTHETIC_OPS = {
    "rev": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "dup": lambda s: "".join(c + c for c in s),
    "cons": lambda s: "".join(c for c in s if c not in "aeiou"),
}
SYNTHETIC_WORD_LEN = (3, 10)  # inclusive
# "synthetic:long": the same operations on words of 20-40 letters, answers of ~16-80 letters (dup: 40-80),
# where one wrong or missing letter shifts everything after it: more room for exposure bias
# (docs/study.md, H4).
SYNTHETIC_LONG_WORD_LEN = (20, 40)


def synthetic_word_len(task):
    """"synthetic" -> SYNTHETIC_WORD_LEN, "synthetic:long" -> SYNTHETIC_LONG_WORD_LEN."""
    variants = {"synthetic": SYNTHETIC_WORD_LEN, "synthetic:long": SYNTHETIC_LONG_WORD_LEN}
    if task not in variants:
        raise ValueError(f"unknown synthetic task {task!r}: use synthetic or synthetic:long")
    return variants[task]


def synthetic_max_new_tokens(task):
    """The longest answer of a synthetic task ("dup" of its longest word) and its EOS."""
    return 2 * synthetic_word_len(task)[1] + 1


def is_test_word(word):
    """1 word in 10, by content: test words are never seen in training, under any operation."""
    return hashlib.sha256(word.encode()).digest()[0] < 26  # 26 / 256 ~ 10%


def synthetic_pairs(n, seed=0, split="train", word_len=SYNTHETIC_WORD_LEN):
    """n (prompt, response) pairs, a pure function of (n, seed, split, word_len); the first m of n are those
    of m. Train and test are disjoint by construction (is_test_word), whatever their seeds and sizes. "val"
    draws from the test words with a stream of its own: held out from training like test, for choosing
    settings without looking at the test prompts (a val prompt can repeat a test prompt only by chance:
    a short word drawn by both)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"synthetic split must be 'train', 'val' or 'test', got {split!r}")
    # a str seed is hashed with sha512 and random() is the one output Python promises never to change
    # the default's stream is as it always was
    variant = "" if word_len == SYNTHETIC_WORD_LEN else f"/{word_len}"
    rng = random.Random(f"nanocpo-synthetic/{split}/{seed}{variant}")
    lo, hi = word_len
    ops, pairs = list(SYNTHETIC_OPS), []
    while len(pairs) < n:
        length = lo + int(rng.random() * (hi - lo + 1))
        word = "".join(chr(97 + int(rng.random() * 26)) for _ in range(length))
        op = ops[int(rng.random() * len(ops))]
        answer = SYNTHETIC_OPS[op](word)
        if answer and is_test_word(word) == (split != "train"):  # "cons" of "aeiou" would be empty
            pairs.append((f"{op} {word}=", answer))
    return pairs


def synthetic_examples(n, seed, tokenizer, max_len, split="train", task="synthetic"):
    """synthetic_pairs as Examples, id "<task>/<split>/<seed>/<i>" (stable: usable as a cache key)."""
    stats, examples = Counter(), []
    for i, (prompt, response) in enumerate(synthetic_pairs(n, seed, split, synthetic_word_len(task))):
        ex = encode_example(f"{task}/{split}/{seed}/{i}", prompt, response, tokenizer, max_len, stats)
        if ex:
            examples.append(ex)
    report(f"{task}/{split}", examples, stats)
    return examples


def synthetic_rejected(example):
    """A wrong answer for the DPO baseline on the synthetic task, made without an LLM: the answer of another
    operation on the same word ("rev hello=" -> "hll", cons's answer), the operation picked by a hash of the
    example's id. It always differs from the truth: if every other operation happens to give the same string
    (or an empty one), the truth with its first letter changed (b for a, else a) is used instead."""
    op, word = example.prompt.rstrip("=").split(" ")
    truth = SYNTHETIC_OPS[op](word)
    others = [o for o in SYNTHETIC_OPS if o != op]
    start = hashlib.sha256(example.id.encode()).digest()[0] % len(others)
    for o in others[start:] + others[:start]:
        answer = SYNTHETIC_OPS[o](word)
        if answer and answer != truth:
            return answer
    return ("b" if truth[0] == "a" else "a") + truth[1:]


def exact_match(gen, ref, eos_id=None):
    """Right answer AND stopped right there. Token ids: gen as generated (cut at its first EOS when
    eos_id is given; padding after it ignored), ref = Example.continuation_ids. Or two plain strings."""
    return (cut_at_eos(gen, eos_id) if eos_id is not None else list(gen)) == list(ref)


def correct_stop(gen, ref, eos_id):
    """The first EOS generated sits where the reference's EOS does: right length, whatever the letters."""
    gen, ref = list(gen), list(ref)
    return eos_id in gen and gen.index(eos_id) == ref.index(eos_id)


def score_synthetic(gen_ids, ref_ids, eos_id):
    """Means over a batch. gen_ids: (B, max_new_tokens) Long from decoding.generate, or lists; ref_ids: the
    examples' continuation_ids. token_accuracy: share of reference positions (EOS included) generated
    right."""
    gens = gen_ids.tolist() if torch.is_tensor(gen_ids) else [list(g) for g in gen_ids]
    refs = [list(r) for r in ref_ids]
    hits = [sum(a == b for a, b in zip(cut_at_eos(g, eos_id), r)) / len(r) for g, r in zip(gens, refs)]
    return {
        "exact_match": sum(exact_match(g, r, eos_id) for g, r in zip(gens, refs)) / len(refs),
        "correct_stop": sum(correct_stop(g, r, eos_id) for g, r in zip(gens, refs)) / len(refs),
        "stopped": sum(eos_id in g for g in gens) / len(gens),
        "token_accuracy": sum(hits) / len(hits),
    }

# ----------------------------------------------------------------------------- one entry point, one batch

def load_task(name, split, tokenizer, max_len, n=None, seed=0, cache_dir=None, val_fraction=0.0):
    """name: "synthetic" | "synthetic:long" | "dolly" | "dolly:<path-or-url>" | "wiki:<path-or-url>"
    | "jsonl:<path-or-url>".
    split: "train" | "test" ("all" too for files, "val" for synthetic). n: the first n examples of the
    split (synthetic default: 20000 train, 500 test or val); seed: the synthetic task's. The paper's split
    applies to dolly (the Dolly dataset, from the hub or a copy of it given by path) and wiki; a jsonl:
    file trains on all its rows unless val_fraction holds some out."""
    kind, _, source = name.partition(":")
    if kind == "synthetic":
        n_default = 20000 if split == "train" else 500
        n = n if n is not None else n_default
        return synthetic_examples(n, seed, tokenizer, max_len, split, task=name)
    if kind == "dolly":
        examples = load_dolly(source or DOLLY_URL, tokenizer, split, max_len, cache_dir)
    elif kind in ("wiki", "jsonl") and source:
        if kind == "wiki":
            examples = load_wiki(source, tokenizer, max_len, split=split, cache_dir=cache_dir)
        else:
            examples = load_jsonl(source, tokenizer, max_len, split=split, cache_dir=cache_dir,
                                  val_fraction=val_fraction)
    else:
        raise ValueError(f"unknown task {name!r}: "
                         "use synthetic[:long], dolly[:src], wiki:<src> or jsonl:<src>")
    return examples[:n] if n is not None else examples


def pad_right(prompts, continuations, pad_id):
    """Prompt and continuation id lists -> input_ids (N, T) Long right-padded, cont_mask (N, T) bool, True
    exactly on continuation positions, final EOS included. The mask is by position, never by token id:
    with pad_id == eos_id the padding looks like EOS but is masked out, and the real EOS is not."""
    T = max(len(p) + len(c) for p, c in zip(prompts, continuations))
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (N, T)
    cont_mask = torch.zeros((len(prompts), T), dtype=torch.bool)         # (N, T)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        cont_mask[i, len(p):len(p) + len(c)] = True
    return input_ids, cont_mask


def collate(examples, pad_id):
    """Examples -> their right-padded batch, (input_ids (N, T), cont_mask (N, T)); see pad_right."""
    return pad_right([e.prompt_ids for e in examples], [e.continuation_ids for e in examples], pad_id)

# ------------------------------------------------------------------ data order: which examples each step sees

@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch(step, n, batch_size, seed):
    """Example indices of step `step`'s global batch: a fresh seeded permutation every epoch.
    A pure function of (step, seed), so resuming needs only the step and any world size sees the same data."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(epoch_order(n, seed, pos // n)[pos % n]) for pos in positions]


def micro_batches(indices, rank, world, micro):
    """This rank's micro-batches. Micro-batch j = rank * accum + m: the same slices as one process with
    world x the accumulation, so 1 and N ranks train on identical micro-batches (and the same BN
    negatives)."""
    accum = len(indices) // (world * micro)
    return [indices[(rank * accum + m) * micro:(rank * accum + m + 1) * micro] for m in range(accum)]
