"""data.py: splits, the BOS/EOS/truncation rule, loaders, collate and the synthetic task.
Tokenizers here are tiny stand-ins for tokenizer.byte_tokenizer() so that these tests need no other file."""
import functools
import http.server
import json
import random
import threading
from collections import Counter

import pytest
import torch

from data import (collate, correct_stop, cut_prompt_left, encode_example, exact_match, load_dolly, load_jsonl,
                  load_task, load_wiki, score_synthetic, synthetic_examples, synthetic_pairs)

EOS = "<|endoftext|>"


class ByteTok:
    """Like tokenizer.byte_tokenizer(): ids 0..255 = bytes, 256 = <|endoftext|> = eos = pad, no BOS."""
    bos_id, eos_id, pad_id = None, 256, 256

    def encode(self, text):
        ids = []
        for i, part in enumerate(text.split(EOS)):
            ids += ([self.eos_id] if i else []) + list(part.encode("utf-8"))
        return ids

    def decode(self, ids):
        return "".join(EOS if i == self.eos_id else chr(i) for i in ids if i <= 256 and i != 257)


class BosTok(ByteTok):
    """A LLaMA-like family: BOS 257, and pad == eos again (the trap case for masks)."""
    bos_id = 257


class AddsBosTok(BosTok):
    """A sentencepiece-style encode() that prepends BOS itself: still exactly one BOS in the end."""
    def encode(self, text):
        return [self.bos_id] + super().encode(text)


def write_lines(path, rows):
    lines = [(r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def dolly_rows(n, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a mat while birds sing about rain and tea".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))
    return [{"instruction": f"q{i} " + text(5), "context": text(8) if i % 3 == 0 else "",
             "response": text(1 + i % 7), "category": "open_qa"} for i in range(n)]

# ----------------------------------------------------------------------------- Dolly


@pytest.fixture(scope="module")
def dolly_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("dolly") / "dolly.jsonl", dolly_rows(15011))


def test_dolly_split_is_the_papers_and_stable(dolly_file, tmp_path, capsys):
    tok = ByteTok()
    train = load_dolly(dolly_file, tok, "train", max_len=512)
    test = load_dolly(dolly_file, tok, "test", max_len=512)
    assert (len(train), len(test)) == (7505, 7506)
    counts = "dolly/train: 7505 examples, 0 prompts truncated, 0 continuations truncated, 0 dropped"
    assert counts in capsys.readouterr().out
    ids_train, ids_test = [e.id for e in train], [e.id for e in test]
    assert not set(ids_train) & set(ids_test) and len(set(ids_train) | set(ids_test)) == 15011
    assert ids_train == sorted(ids_train, key=lambda s: int(s.split("-")[1]))  # returned in file order
    # a second run gives the same split, in the same order
    assert [e.id for e in load_dolly(dolly_file, tok, "train", max_len=512)] == ids_train
    # the split hashes content, not line numbers: shuffled lines give the same train set
    lines = open(dolly_file, encoding="utf-8").read().splitlines()
    random.Random(1).shuffle(lines)
    shuffled = load_dolly(write_lines(tmp_path / "shuffled.jsonl", lines), tok, "train", max_len=512)
    assert {(e.prompt, e.response) for e in shuffled} == {(e.prompt, e.response) for e in train}
    # pinned: the split must not change between versions of this code (salt, key, rule)
    assert ids_train[:6] == ["dolly-1", "dolly-3", "dolly-6", "dolly-7", "dolly-12", "dolly-14"]


def test_dolly_split_keeps_the_proportion_for_other_sizes(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", dolly_rows(100))
    train, test = (load_dolly(path, ByteTok(), s, max_len=512) for s in ("train", "test"))
    assert (len(train), len(test)) == (100 * 7505 // 15011, 100 - 100 * 7505 // 15011) == (49, 51)
    assert len(load_dolly(path, ByteTok(), "all", max_len=512)) == 100


def test_dolly_template_with_and_without_context(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"instruction": "Name a fruit. ", "context": "", "response": " Apple.\n", "category": "x"},
        {"instruction": "Who?", "context": "Ann met Bob.", "response": "Ann"},
        {"instruction": "Why?", "response": "No context field at all is fine."}])
    a, b, c = load_dolly(path, ByteTok(), "all", max_len=512)
    assert a.prompt == "### Instruction:\nName a fruit.\n\n### Response:\n" and a.response == "Apple."
    assert b.prompt == "### Instruction:\nWho?\n\n### Context:\nAnn met Bob.\n\n### Response:\n"
    assert c.prompt == "### Instruction:\nWhy?\n\n### Response:\n"
    assert a.prompt_ids == list(a.prompt.encode()) and a.continuation_ids == list(b"Apple.") + [256]
    assert [e.id for e in (a, b, c)] == ["dolly-0", "dolly-1", "dolly-2"]


@pytest.mark.parametrize("bad, message", [
    ('{"instruction": "x", "context": ""', ":3: bad JSON"),
    ('{"instruction": "x", "context": ""}', ":3: missing field 'response'"),
    ('{"instruction": "x", "context": 7, "response": "y"}', ":3: field 'context' must be a string, got int"),
    ('["instruction", "x"]', ":3: expected a JSON object, got list"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, bad, message):
    good = {"instruction": "a", "context": "", "response": "b"}
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad, good])  # blank line 2 is skipped, not an error
    with pytest.raises(ValueError) as e:
        load_dolly(path, ByteTok(), "train", max_len=64)
    assert str(e.value).startswith(path + message)

# ----------------------------------------------------------------------------- Wikipedia


def test_wiki_split_is_15_85_of_tokens(tmp_path, capsys):
    docs = ["x" * 100, "é" * 10, "ab", "z"]  # 100 tokens, 20 byte tokens, 2 tokens, 1 token (too short)
    path = write_lines(tmp_path / "w.jsonl", [{"title": "T", "text": docs[0]}, {"text": docs[1]},
                                              {"text": docs[2]}, {"text": docs[3]}])
    for tok in (ByteTok(), BosTok()):
        a, b, c = load_wiki(path, tok, max_len=1024)
        head = [] if tok.bos_id is None else [tok.bos_id]
        assert a.prompt_ids == head + [ord("x")] * 15 and a.continuation_ids == [ord("x")] * 85 + [256]
        assert b.prompt_ids == head + list("é".encode()) * 1 + [0xC3] and len(b.continuation_ids) == 17 + 1
        assert b.prompt_ids[len(head):] + b.continuation_ids[:-1] == list(docs[1].encode())  # cut in ids
        assert len(c.prompt_ids) == len(head) + 1 and c.continuation_ids == [ord("b"), 256]
        assert a.prompt == "x" * 15 and a.response == "x" * 85
        counts = ("wiki/all: 3 examples, 0 prompts truncated, 0 continuations truncated, 0 dropped, "
                  "1 too short")
        assert counts in capsys.readouterr().out
    # plain text, one document per line; a long document is cut to max_len before the 15/85 split
    path = write_lines(tmp_path / "w.txt", ["y" * 20, "", "q" * 500])
    y, q = load_wiki(path, ByteTok(), max_len=101)
    assert (len(y.prompt_ids), len(y.continuation_ids)) == (3, 18)
    assert (len(q.prompt_ids), len(q.continuation_ids)) == (15, 86)
    assert "1 documents cut to max_len" in capsys.readouterr().out

# ----------------------------------------------------------------------------- BOS, EOS, truncation, drops


@pytest.mark.parametrize("tok", [ByteTok(), BosTok(), AddsBosTok()], ids=["gpt2", "bos", "adds-bos"])
def test_one_eos_and_bos_only_where_used_and_mask_covers_eos(tok):
    examples = [encode_example("a", "hi", "there" + EOS, tok, max_len=64),      # text already ends in EOS
                encode_example("b", "q", "ok" + EOS + EOS, tok, max_len=64),
                encode_example("c", "longer prompt", "x", tok, max_len=64)]
    for e in examples:
        assert e.continuation_ids[-1] == tok.eos_id and e.continuation_ids.count(tok.eos_id) == 1
        seq = e.prompt_ids + e.continuation_ids
        if tok.bos_id is None:
            assert 257 not in seq
        else:
            assert seq[0] == tok.bos_id and seq.count(tok.bos_id) == 1
    input_ids, cont_mask = collate(examples, pad_id=tok.pad_id)
    T = max(len(e.prompt_ids) + len(e.continuation_ids) for e in examples)
    assert input_ids.shape == cont_mask.shape == (3, T)
    assert input_ids.dtype == torch.long and cont_mask.dtype == torch.bool
    for i, e in enumerate(examples):
        p, c = len(e.prompt_ids), len(e.continuation_ids)
        assert input_ids[i, :p + c].tolist() == e.prompt_ids + e.continuation_ids
        assert cont_mask[i].nonzero().flatten().tolist() == list(range(p, p + c))  # final EOS included
        # pad == eos, masked out
        assert (input_ids[i, p + c:] == tok.pad_id).all() and not cont_mask[i, p + c:].any()
    assert cont_mask[0, len(examples[0].prompt_ids) + len(examples[0].continuation_ids) - 1]


@pytest.mark.parametrize("tok", [ByteTok(), BosTok()], ids=["gpt2", "bos"])
def test_truncation_keeps_continuation_and_cuts_prompt_from_left(tok):
    head = [] if tok.bos_id is None else [tok.bos_id]
    stats = Counter()
    e = encode_example(0, "0123456789", "abc", tok, max_len=10, stats=stats)
    assert e.continuation_ids == list(b"abc") + [256]
    assert e.prompt_ids == head + list(b"0123456789"[-(6 - len(head)):])  # the prompt's END survives
    assert len(e.prompt_ids) + len(e.continuation_ids) == 10 and e.prompt == "0123456789" and e.id == "0"
    # a continuation that alone exceeds max_len - 1 keeps its start and its EOS; one prompt token is left
    e = encode_example(1, "0123", "abcdefghij", tok, max_len=6, stats=stats)
    assert e.continuation_ids == list(b"abcd") + [256]
    assert e.prompt_ids == (head or [ord("3")])
    assert stats == {"prompts truncated": 2, "continuations truncated": 1}
    # fits exactly: nothing cut
    e = encode_example(2, "01", "ab", tok, max_len=5 + len(head))
    assert e.prompt_ids == head + list(b"01") and e.continuation_ids == list(b"ab") + [256]


def test_zero_continuation_and_zero_prompt_dropped_and_counted(tmp_path, capsys):
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "response": "r", "id": 7}, {"prompt": "p", "response": ""},
        {"prompt": "p", "response": EOS}, {"prompt": "", "response": "r"}])
    kept = load_jsonl(path, ByteTok(), max_len=32)
    assert [e.id for e in kept] == ["7"]
    counts = "pairs/all: 1 examples, 0 prompts truncated, 0 continuations truncated, 3 dropped"
    assert counts in capsys.readouterr().out
    # an empty prompt is fine when BOS precedes the continuation
    kept = load_jsonl(path, BosTok(), max_len=32)
    assert [e.id for e in kept] == ["7", "pairs-3"] and kept[1].prompt_ids == [257]
    assert encode_example("x", "p", "r", ByteTok(), max_len=2) is None  # no room for prompt + response + EOS

# ----------------------------------------------------------------------------- synthetic task and metrics


def test_synthetic_task_is_deterministic_disjoint_and_correct():
    train = synthetic_pairs(3000, seed=0)
    assert train == synthetic_pairs(3000, seed=0) and train[:100] == synthetic_pairs(100, seed=0)
    assert train != synthetic_pairs(3000, seed=1)
    # pinned: the same pairs on every machine and Python version (random.Random(str).random() only)
    assert train[:3] == [("cons ypo=", "yp"),
                         ("dup fkshcfcdnc=", "ffkksshhccffccddnncc"),
                         ("rev woesczb=", "bzcseow")]
    test = synthetic_pairs(1000, seed=0, split="test")
    word = lambda prompt: prompt.split(" ")[1][:-1]
    assert not {word(p) for p, _ in train} & {word(p) for p, _ in synthetic_pairs(1000, seed=5, split="test")}
    assert not {word(p) for p, _ in train} & {word(p) for p, _ in test}
    ops = {"rev": lambda s: s[::-1],
           "sort": lambda s: "".join(sorted(s)),
           "dup": lambda s: "".join(2 * c for c in s),
           "cons": lambda s: "".join(c for c in s if c not in "aeiou")}
    for prompt, response in train + test:
        op, rest = prompt.split(" ")
        assert rest.endswith("=") and 3 <= len(rest) - 1 <= 10 and rest[:-1].isalpha() and rest[:-1].islower()
        assert response == ops[op](rest[:-1]) and response
        assert len(prompt) + len(response) + 1 <= 48
    assert {p.split(" ")[0] for p, _ in train} == set(ops)
    assert len({len(r) for _, r in train}) > 10  # answer lengths vary: stopping must be learned
    ex = synthetic_examples(50, 0, BosTok(), max_len=48)
    assert [e.prompt for e in ex] == [p for p, _ in train[:50]] and all(e.prompt_ids[0] == 257 for e in ex)
    assert load_task("synthetic", "test", ByteTok(), 48, n=20)[0].prompt == test[0][0]


def test_synthetic_metrics_on_hand_examples():
    E, P = 256, 256  # eos == pad, as with the byte tokenizer
    ref = [ord("c"), ord("b"), E]
    def both(gen):
        return exact_match(gen, ref, E), correct_stop(gen, ref, E)
    assert both([99, 98, E, P, P]) == (True, True)
    assert both([99, 98, 97, E, P]) == (False, False)    # too long
    assert both([99, E, P, P, P]) == (False, False)      # stopped early
    assert both([99, 98, 97, 96, 95]) == (False, False)  # never stopped
    assert both([99, 97, E, P, P]) == (False, True)      # wrong letter
    assert exact_match("dcba", "dcba") and not exact_match("dcb", "dcba")
    gens = torch.tensor([[99, 98, E, P], [99, 97, E, P], [99, E, P, P], [99, 98, 98, 98]])
    s = score_synthetic(gens, [ref] * 4, E)
    assert s == {"exact_match": 0.25, "correct_stop": 0.5, "stopped": 0.75,
                 "token_accuracy": pytest.approx((3 + 2 + 1 + 2) / 12)}

# ----------------------------------------------------------------------------- load_task, URL sources


def test_load_task_names(tmp_path):
    jsonl = write_lines(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)])
    wiki = write_lines(tmp_path / "w.txt", ["w" * (20 + i) for i in range(40)])
    dolly = write_lines(tmp_path / "d.jsonl", dolly_rows(40))
    tok = ByteTok()
    assert len(load_task(f"jsonl:{jsonl}", "all", tok, 64)) == 40
    n_train = len(load_task(f"jsonl:{jsonl}", "train", tok, 64))
    assert n_train + len(load_task(f"jsonl:{jsonl}", "test", tok, 64)) == 40
    assert len(load_task(f"wiki:{wiki}", "train", tok, 64, n=5)) == 5
    assert [e.id for e in load_task(f"dolly:{dolly}", "test", tok, 256)] == \
        [e.id for e in load_dolly(dolly, tok, "test", 256)]
    for bad in ("wiki", "nope:x", "jsonl"):
        with pytest.raises(ValueError):
            load_task(bad, "train", tok, 64)
    with pytest.raises(ValueError):
        load_task("synthetic", "valid", tok, 64)
    with pytest.raises(FileNotFoundError):
        load_task(f"jsonl:{tmp_path}/missing.jsonl", "all", tok, 64)


def test_url_source_is_downloaded_into_the_cache(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    write_lines(served / "pairs.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pairs.jsonl"
        cache = tmp_path / "cache"
        got = load_task(f"jsonl:{url}", "all", ByteTok(), 16, cache_dir=str(cache))
        assert [(e.id, e.prompt, e.response) for e in got] == [("pairs-0", "a", "b"), ("pairs-1", "c", "d")]
        (served / "pairs.jsonl").unlink()  # the second load must come from the cache
        assert len(load_task(f"jsonl:{url}", "all", ByteTok(), 16, cache_dir=str(cache))) == 2
        assert [p.name[13:] for p in cache.iterdir()] == ["pairs.jsonl"]
    finally:
        server.shutdown()


def test_cut_prompt_left_keeps_the_end_and_the_bos():
    assert cut_prompt_left([1, 2, 3], 5) == [1, 2, 3]  # fits: whole
    assert cut_prompt_left([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert cut_prompt_left([9, 2, 3, 4, 5], 3, keep_bos=True) == [9, 4, 5]  # BOS first, and it counts in room
    assert cut_prompt_left([9, 2, 3], 1, keep_bos=True) == [9]
