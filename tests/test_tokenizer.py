"""tokenizer.py against transformers and the `tokenizers` library (test-only oracles): byte-level BPE
tokenizer.json files that lack single bytes, split digits one by one, split by their own regex, or carry
added special tokens whose EOS is not <|endoftext|>; a tokenizer.json-only LLaMA folder written by
transformers; special ids from the folder's files; special tokens encoded only when allowed."""
import json
import os

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

import hf
import tokenizer
from tokenizer import bytes_to_unicode, load_tokenizer

# ids 0, 1, 2: EOS is <|im_end|>, as in chat models
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["def f(x):\n    return x * 2  # double it",
          "The quick brown fox jumps over the lazy dog 1234567.",
          "Ünïcödé: naïve café, 東京は晴れ, Привет мир, emoji 🙂🚀",
          "  leading and   inner   spaces\t\ttabs\n\nnewlines",
          "numbers 3.14159 2026-12-01 1e-9 0x1F 1,000,000",
          "it's we're they've I'd you'll",
          "{\"key\": [1, 2, 3]}"] * 20
STRINGS = [
    "hello world", " hello", "hello ", "  two leading", "trailing two  ", "a\tb\tc", "line1\nline2\r\nline3",
    "\n\n\n", "   ", "", "x", "1234567890", "3.14159", "2026-12-01T23:59:59Z", "1,000,000 and 12 and 7",
    "  42", "abc123def", "١٢٣ arabic digits ²", "naïve café", "東京は晴れ", "Привет, мир!", "🙂🚀 emoji",
    "e\u0301 combining",
    "def f(x):\n    return x * 2", "for (int i = 0; i < n; ++i) { s += a[i]; }", "if x != y:\n\tpass",
    "{\"key\": [1, 2, 3]}", "it's we're they've I'd you'll", "IT'S LOUD", "tab\t\t\tafter",
    "mixed \t \n whitespace",
    "under_score-dash.dot", "http://example.com/a?b=c&d=e", "C:\\path\\to\\file.txt", "$100 @user #tag %50",
    "The quick brown fox jumps over the lazy dog.", "quick quick quick", "ﬁ ligature ﬀ", "ÅÄÖ åäö", "x  1",
    "x   1 ab12",
    "a\u00a0nbsp", "zero\u200bwidth", "<|im_end", "|>", "ends with newline\n", "      indented code",
    "5 + 7 = 12",
    "Ω≈ç√∫˜µ≤≥÷", "mañana 😀 12:30",
]
assert len(STRINGS) == 50
# bytes valid UTF-8 never has, and BEL: as in real vocabularies
ABSENT = [0x07, 0xC0, 0xC1, *range(0xF5, 0x100)]


def train_bpe(pre_tokenizer, alphabet_bytes=range(256), vocab_size=700):
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizer, decoders.ByteLevel()
    alphabet = [bytes_to_unicode()[b] for b in alphabet_bytes]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    t.train_from_iterator(CORPUS, trainer)
    return t


def save_fast(t, folder, legacy_merges=False, **tokens):
    """As transformers saves a fast tokenizer: tokenizer.json + tokenizer_config.json."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, **tokens)
    fast.save_pretrained(folder)
    if legacy_merges:  # older files spell each merge "a b"
        path = os.path.join(folder, "tokenizer.json")
        tj = json.load(open(path, encoding="utf-8"))
        tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
        json.dump(tj, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    chat = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    lacking = [b for b in range(256) if b not in ABSENT]
    def byte_level():
        return pre_tokenizers.ByteLevel(add_prefix_space=False)

    def digits():
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level()])

    def split_regex():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(__import__("tokenizers").Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out = {
        "lacks_bytes": save_fast(train_bpe(byte_level(), lacking), root / "a", eos_token="<|endoftext|>"),
        "digits": save_fast(train_bpe(digits(), lacking), root / "b", **chat),
        "specials": save_fast(train_bpe(byte_level()), root / "c", legacy_merges=True, **chat),
        "split_regex": save_fast(train_bpe(split_regex()), root / "d", **chat),
    }
    out["llama"] = llama_folder(root / "llama", train_bpe(digits(), lacking), chat)
    return out


def llama_folder(folder, t, chat):
    """A tiny random LlamaForCausalLM and a fast tokenizer, both saved by transformers:
    tokenizer.json only."""
    ids = {k: t.token_to_id(v) for k, v in chat.items()}
    cfg = transformers.LlamaConfig(vocab_size=t.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
                                   pad_token_id=ids["pad_token"])
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    save_fast(t, folder, **chat)
    assert not os.path.exists(os.path.join(folder, "tokenizer.model"))
    assert not os.path.exists(os.path.join(folder, "vocab.json"))
    return str(folder)


KINDS = ["lacks_bytes", "digits", "specials", "split_regex", "llama"]


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_transformers(folders, kind):
    ours, theirs = load_tokenizer(folders[kind]), transformers.AutoTokenizer.from_pretrained(folders[kind])
    for s in STRINGS:
        ids = theirs.encode(s, add_special_tokens=False)
        assert ours.encode(s) == ids, s
        assert ours.decode(ids) == theirs.decode(ids) == s, s


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_match_transformers(folders, kind):
    ours, theirs = load_tokenizer(folders[kind]), transformers.AutoTokenizer.from_pretrained(folders[kind])
    assert ours.eos_id == theirs.eos_token_id is not None
    assert ours.specials == {"bos": theirs.bos_token_id, "eos": theirs.eos_token_id,
                             "pad": theirs.pad_token_id}
    if kind != "lacks_bytes":  # EOS is <|im_end|>, not <|endoftext|>
        assert ours.eos_id == 2 and ours.specials["bos"] == 1 and ours.pad_id == 0


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_encode_only_when_allowed(folders, kind):
    ours, theirs = load_tokenizer(folders[kind]), transformers.AutoTokenizer.from_pretrained(folders[kind])
    text = "<|im_start|>user\nhi 12<|im_end|>\n<|endoftext|>"
    as_tokens = theirs.encode(text, add_special_tokens=False)      # transformers matches specials by default
    assert [i for i in as_tokens if i in (0, 1, 2)] == [1, 2, 0]
    forged = ours.encode(text)                                     # data can't forge them...
    assert not set(forged) & {0, 1, 2}
    assert ours.decode(forged) == text
    assert ours.encode(text, allowed_special="all") == as_tokens  # ...a template that declares them can
    im_end_only = ours.encode("<|im_start|>user\nhi 12") + [2] + ours.encode("\n<|endoftext|>")
    assert ours.encode(text, allowed_special={"<|im_end|>"}) == im_end_only


def test_absent_byte_is_an_error_only_when_it_occurs(folders):
    ours = load_tokenizer(folders["lacks_bytes"])
    path = os.path.join(folders["lacks_bytes"], "tokenizer.json")
    vocab = json.load(open(path, encoding="utf-8"))["model"]["vocab"]
    assert sum(bytes_to_unicode()[b] in vocab for b in range(256)) == 256 - len(ABSENT)
    assert ours.encode("fine")
    with pytest.raises(ValueError, match=r"0x7.*vocabulary lacks"):
        ours.encode("bell \x07")


def test_save_pretrained_tokenizer_loads_in_transformers(folders, tmp_path):
    """Our save_pretrained, from a tokenizer.json folder (files carried over) and from vocab.json +
    merges.txt (tokenizer.json written): AutoTokenizer loads both and encodes as we do."""
    model, tok = hf.load(folders["llama"])
    assert model.config.eos_id == 2 and model.config.bos_id == 1
    hf.save_pretrained(model, tmp_path / "llama", tok)
    gpt2_files = tmp_path / "gpt2files"
    vocab = json.load(open(os.path.join(folders["specials"], "tokenizer.json"), encoding="utf-8"))["model"]
    os.makedirs(gpt2_files)
    json.dump(vocab["vocab"], open(gpt2_files / "vocab.json", "w", encoding="utf-8"), ensure_ascii=False)
    merges = "#version: 0.2\n" + "".join(m + "\n" for m in vocab["merges"])
    (gpt2_files / "merges.txt").write_text(merges, encoding="utf-8")
    from_files = load_tokenizer(str(gpt2_files))
    assert from_files.eos_id == 0  # <|endoftext|>, the GPT-2 default, when no file says otherwise
    model.config.eos_id, model.config.bos_id = from_files.eos_id, None
    hf.save_pretrained(model, tmp_path / "llama_gpt2files", from_files)
    for folder, ours in [(tmp_path / "llama", tok), (tmp_path / "llama_gpt2files", from_files)]:
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        for s in STRINGS:
            assert ours.encode(s) == theirs.encode(s, add_special_tokens=False), s
        config = json.load(open(folder / "config.json"))
        generation = json.load(open(folder / "generation_config.json"))
        assert config["eos_token_id"] == generation["eos_token_id"] == theirs.eos_token_id == ours.eos_id
        assert config["bos_token_id"] == generation["bos_token_id"] == theirs.bos_token_id
    assert load_tokenizer(str(tmp_path / "llama")).encode("héllo 12") == tok.encode("héllo 12")


def test_precedence_of_special_id_files(folders, tmp_path):
    """tokenizer_config.json names the token > generation_config.json > config.json > the file's default."""
    src = folders["specials"]
    files = {n: open(os.path.join(src, n), "rb").read() for n in ("tokenizer.json", "tokenizer_config.json")}
    assert tokenizer.Tokenizer(files, {"eos_token_id": 1}).eos_id == 2         # tokenizer_config wins
    no_names = {"tokenizer.json": files["tokenizer.json"]}
    assert tokenizer.Tokenizer(no_names).eos_id == 0                             # default: <|endoftext|>
    assert tokenizer.Tokenizer(no_names, {"eos_token_id": [2, 0]}).eos_id == 2  # config.json, a list
    gen = {**no_names, "generation_config.json": json.dumps({"eos_token_id": 1}).encode()}
    assert tokenizer.Tokenizer(gen, {"eos_token_id": 2}).eos_id == 1            # generation_config > config


def test_unsupported_kinds_name_the_file(tmp_path):
    t = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*WordPiece"):
        load_tokenizer(str(tmp_path))
    u = HFTokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0))
    u.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*Unigram.*tokenizer\.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.txt").write_text("[UNK]\na\n")
    with pytest.raises(ValueError, match=r"no tokenizer we can read"):
        load_tokenizer(str(tmp_path))


def test_many_strings_with_a_4000_token_vocabulary(tmp_path):
    """tiktoken's ranks = HF's merge order: checked on a real-sized vocabulary trained on this repository's
    own source and docs, over the whole text (~85k tokens) and 2000 random slices of it."""
    import glob
    import random
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(root, "*.py")) +
                                                            glob.glob(os.path.join(root, "*.md")))]
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIALS,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = save_fast(t, tmp_path / "big", eos_token="<|endoftext|>")
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    full, rng = "\n".join(texts), random.Random(0)
    assert ours.encode(full, allowed_special="all") == theirs.encode(full, add_special_tokens=False)
    for _ in range(2000):
        i = rng.randrange(len(full))
        s = full[i:i + rng.randint(1, 300)]
        assert ours.encode(s, allowed_special="all") == theirs.encode(s, add_special_tokens=False), s


def test_sentencepiece_special_tokens_only_when_allowed(tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert 2 not in tok.encode("the end</s>")
    assert tok.encode("the end</s>", allowed_special={"</s>"}) == tok.encode("the end") + [2]
