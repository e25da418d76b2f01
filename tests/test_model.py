"""model.py against transformers: logits, greedy and beam generation, sampling, HF state-dict round trips.
Tiny random models made by transformers at test time (fixed seeds); no files, no network."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
import transformers

from decoding import generate, sample_next_token
from hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict
from model import Linear, ModelConfig, Transformer

PAD = 2


@contextlib.contextmanager
def threads(n):
    """The module runs with 1 thread; the few-rows Linear path needs 2+."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: a second thread only adds sync cost, and on a busy machine waiting for it costs 100x
    with threads(1):
        yield


def hf_gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=211, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=PAD, **kw)


def hf_llama_config(**kw):
    # grouped-query attention (8 query heads share 2 kv heads) and a rope_theta other than 10000
    return transformers.LlamaConfig(vocab_size=223, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, rope_theta=5000.0,
                                    max_position_embeddings=128, rms_norm_eps=1e-5,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=PAD, **kw)


def make_pair(family, initializer_range=0.02):
    """(transformers model, our model with the same weights), both eval, float32."""
    torch.manual_seed(0)
    make = hf_gpt2_config if family == "gpt2" else hf_llama_config
    hf_cfg = make(initializer_range=initializer_range)
    hf_cfg._attn_implementation = "eager"   # the plain-math reference
    hf = (transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM)(hf_cfg).eval()
    cfg = config_from_hf(hf_cfg.to_dict())
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return hf, ours


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    return make_pair(request.param)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def peaked_pair(request):
    # larger weights -> peaked next-token distributions, so greedy/beam choices aren't near-ties that
    # float rounding (different but equally right kernels) could flip
    return make_pair(request.param, initializer_range=0.3)


def left_padded_prompts(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        idx[i, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, T - n:] = 1
    return idx, mask


def hf_new_tokens(hf, idx, mask, n, **kw):
    out = hf.generate(idx, attention_mask=mask, max_new_tokens=n, pad_token_id=PAD, **kw)[:, idx.shape[1]:]
    return torch.cat([out, out.new_full((out.shape[0], n - out.shape[1]), PAD)], dim=1)  # HF stops early


# ----------------------------------------------------------------------------- forward

def test_logits_match_transformers(pair):
    hf, ours = pair
    x = torch.randint(0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_hidden_states_feed_lm_head(pair):
    _, ours = pair
    x = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        h = ours(x, return_hidden=True)
        assert h.shape == (2, 9, ours.config.n_embd)
        torch.testing.assert_close(ours.lm_head(h), ours(x))


def test_left_padding_gives_the_unpadded_logits(pair):
    _, ours = pair
    idx, mask = left_padded_prompts(ours.config.vocab_size, [5, 11])
    with torch.no_grad():
        padded = ours(idx, attention_mask=mask)[0, -5:]
        alone = ours(idx[:1, -5:])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- generation vs transformers

def pick_eos(hf, idx, mask, n):
    """A token the model emits mid-generation in row 0, so rows stop at different steps."""
    out = hf_new_tokens(hf, idx, mask, n, do_sample=False, eos_token_id=None)
    return int(out[0, n // 3])


def test_few_rows_linear_path_matches_f_linear():
    torch.manual_seed(0)
    with threads(2):
        for bias in (True, False):
            lin = Linear(24, 37, bias=bias)     # 37 weight rows: not divisible by 2 threads
            for shape in [(1, 24), (3, 1, 24), (16, 24), (2, 9, 24)]:
                x = torch.randn(shape)
                torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("n_threads", [1, 2])
def test_greedy_matches_transformers(peaked_pair, n_threads):
    hf, ours = peaked_pair
    idx, mask = left_padded_prompts(ours.config.vocab_size, [4, 9, 13, 7])
    eos = pick_eos(hf, idx, mask, 32)
    expected = hf_new_tokens(hf, idx, mask, 32, do_sample=False, eos_token_id=eos)
    with threads(n_threads):
        got = generate(ours, idx, 32, attention_mask=mask, temperature=0, eos_id=eos, pad_id=PAD)
    assert (expected == PAD).any(), "EOS never hit: the test would not exercise stopping"
    assert torch.equal(got, expected)


@pytest.mark.parametrize("length_penalty", [1.0, 0.3])
def test_beam_search_matches_transformers(peaked_pair, length_penalty):
    hf, ours = peaked_pair
    idx, mask = left_padded_prompts(ours.config.vocab_size, [4, 9, 13], seed=2)
    eos = pick_eos(hf, idx, mask, 32)
    expected = hf_new_tokens(hf, idx, mask, 32, do_sample=False, num_beams=4, early_stopping=False,
                             length_penalty=length_penalty, eos_token_id=eos)
    got = generate(ours, idx, 32, attention_mask=mask, num_beams=4, length_penalty=length_penalty,
                   eos_id=eos, pad_id=PAD)
    assert torch.equal(got, expected)


def reference_generate(model, idx, mask, n, eos, generator, **sampling):
    """No cache: re-run the whole sequence each step, sampling with the same function."""
    done = torch.zeros(idx.shape[0], dtype=torch.bool)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(idx, attention_mask=mask)[:, -1]
        tok = sample_next_token(logits, generator=generator, **sampling).masked_fill(done, PAD)
        done |= tok == eos
        out.append(tok)
        idx, mask = torch.cat([idx, tok[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("sampling", [dict(top_k=20), dict(top_p=0.9, temperature=0.8)])
def test_sampling_generate_matches_no_cache_reference(peaked_pair, sampling):
    _, ours = peaked_pair
    idx, mask = left_padded_prompts(ours.config.vocab_size, [3, 8, 6])
    free = generate(ours, idx, 16, attention_mask=mask, eos_id=-1, generator=torch.Generator().manual_seed(7),
                    **sampling)
    eos = int(free[1, 4])   # row 1 then stops at step 4 at the latest (same random stream up to there)
    got = generate(ours, idx, 16, attention_mask=mask, eos_id=eos, pad_id=PAD,
                   generator=torch.Generator().manual_seed(7), **sampling)
    again = generate(ours, idx, 16, attention_mask=mask, eos_id=eos, pad_id=PAD,
                     generator=torch.Generator().manual_seed(7), **sampling)
    ref = reference_generate(ours, idx, mask, 16, eos, torch.Generator().manual_seed(7), **sampling)
    assert torch.equal(got, again)
    assert torch.equal(got, ref)
    assert (got == PAD).any()
    row = got[1].tolist()   # pad_id after EOS, nothing else
    assert row.index(eos) < 15 and set(row[row.index(eos) + 1:]) == {PAD}


def test_generate_without_mask_and_zero_tokens(pair):
    _, ours = pair
    idx = torch.randint(3, 50, (2, 6))
    assert generate(ours, idx, 0).shape == (2, 0)
    a = generate(ours, idx, 5, temperature=0, eos_id=-1)
    b = generate(ours, idx, 5, attention_mask=torch.ones_like(idx), temperature=0, eos_id=-1)
    assert a.shape == (2, 5) and torch.equal(a, b)
    with pytest.raises(ValueError, match="LEFT"):
        generate(ours, idx, 3, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]] * 2))


# ----------------------------------------------------------------------------- sampling

def draws(logits, n, seed=0, **kw):
    return sample_next_token(logits.expand(n, -1), generator=torch.Generator().manual_seed(seed), **kw)


def assert_matches_distribution(samples, p, n):
    freq = torch.bincount(samples, minlength=p.numel()).double() / n
    assert (freq - p).abs().max() < 5 * (0.25 / n) ** 0.5     # 5 sigma at worst-case variance


def test_top_k_samples_stay_in_the_top_k_set():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    n, k, temp = 20000, 5, 0.7
    s = draws(logits, n, top_k=k, temperature=temp)
    top = set(logits[0].topk(k).indices.tolist())
    assert set(s.tolist()) <= top
    p = torch.zeros(50, dtype=torch.float64)
    idx = torch.tensor(sorted(top))
    p[idx] = torch.softmax(logits[0, idx].double() / temp, 0)
    assert_matches_distribution(s, p, n)


def test_top_p_samples_stay_in_the_nucleus():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 2
    n, top_p = 20000, 0.8
    s = draws(logits, n, top_p=top_p)
    probs = torch.softmax(logits[0].double(), 0)
    nucleus, mass = [], 0.0
    # the smallest set of most likely tokens with mass >= top_p
    for i in probs.argsort(descending=True).tolist():
        nucleus.append(i)
        mass += probs[i].item()
        if mass >= top_p:
            break
    assert set(s.tolist()) <= set(nucleus) and len(nucleus) < 50
    p = torch.zeros(50, dtype=torch.float64)
    p[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert_matches_distribution(s, p, n)


def test_plain_sampling_follows_softmax_and_seeds_reproduce():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(2))
    s = draws(logits, 20000)
    assert_matches_distribution(s, torch.softmax(logits[0].double(), 0), 20000)
    assert torch.equal(draws(logits, 100, seed=3, top_k=10), draws(logits, 100, seed=3, top_k=10))
    assert not torch.equal(draws(logits, 100, seed=3), draws(logits, 100, seed=4))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))


# ----------------------------------------------------------------------------- HF state dicts and configs

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_to_hf_state_dict_loads_into_transformers(family):
    torch.manual_seed(3)
    hf_cfg = (hf_gpt2_config if family == "gpt2" else hf_llama_config)()
    ours = Transformer(config_from_hf(hf_cfg.to_dict())).eval()    # our own init, not HF's
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    hf_back = cls(type(hf_cfg)(**config_to_hf(ours.config))).eval()          # through our config_to_hf too
    result = hf_back.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"} and hf_back.lm_head.weight is not None
    x = torch.randint(0, ours.config.vocab_size, (2, 37))
    with torch.no_grad():
        assert (ours(x) - hf_back(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_config_round_trip(family):
    hf_cfg = (hf_gpt2_config if family == "gpt2" else hf_llama_config)()
    cfg = config_from_hf(hf_cfg.to_dict())
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert cfg.n_kv_head == (4 if family == "gpt2" else 2)
    if family == "llama":
        assert cfg.rope_theta == 5000.0 and not cfg.tie_word_embeddings


def test_meta_device_build_then_assign_keeps_embeddings_tied(pair):
    hf, ours = pair
    with torch.device("meta"):
        model = Transformer(ours.config)
    sd = from_hf_state_dict(hf.state_dict(), ours.config)
    if ours.config.tie_word_embeddings:
        del sd["lm_head.weight"]          # a tied checkpoint may leave it out
    model.load_state_dict(sd, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    if ours.config.tie_word_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight
    x = torch.randint(0, ours.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x))


def test_original_gpt2_checkpoint_names_load():
    hf, ours = make_pair("gpt2")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128).tril()   # the saved causal mask in old checkpoints
    ours2 = Transformer(ours.config)
    ours2.load_state_dict(from_hf_state_dict(sd, ours.config))
    x = torch.randint(0, 211, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours2(x), ours(x))


def test_bad_configs_and_state_dicts_raise_value_error():
    with pytest.raises(ValueError, match="model_type 'bert'"):
        config_from_hf({"model_type": "bert", "hidden_size": 64})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"n_embd": 64})
    with pytest.raises(ValueError, match="n_head"):
        config_from_hf(dict(hf_gpt2_config().to_dict(), n_head=5))
    with pytest.raises(ValueError, match="num_key_value_heads|n_kv_head"):
        config_from_hf(dict(hf_llama_config().to_dict(), num_key_value_heads=3))
    with pytest.raises(ValueError, match="n_positions"):
        config_from_hf({k: v for k, v in hf_gpt2_config().to_dict().items() if k != "n_positions"})
    with pytest.raises(ValueError, match="rope"):
        llama3_rope = {"rope_type": "llama3", "factor": 8.0}
        config_from_hf(dict(hf_llama_config().to_dict(), rope_parameters=llama3_rope))

    hf, ours = make_pair("llama")
    sd = hf.state_dict()
    bad = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(24, 64)})
    names_the_tensor = r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\).*\(24, 64\)"
    with pytest.raises(ValueError, match=names_the_tensor):
        from_hf_state_dict(bad, ours.config)
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        from_hf_state_dict({k: v for k, v in sd.items() if k != "model.norm.weight"}, ours.config)
    with pytest.raises(ValueError, match="unexpected.*model.layers.7"):
        from_hf_state_dict(dict(sd, **{"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}), ours.config)
    with pytest.raises(ValueError, match="embed_tokens"):   # a checkpoint for another vocabulary
        from_hf_state_dict(sd, config_from_hf(dict(hf_llama_config().to_dict(), vocab_size=300)))


def test_init_for_training_from_scratch():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=8, n_embd=128, n_head=4, n_kv_head=4, n_inner=512, vocab_size=1000))
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / 4) < 0.001     # 0.02 / sqrt(2 * 8)
    assert (m.blocks[0].attn.qkv.bias == 0).all() and (m.norm_f.weight == 1).all()
    assert m.lm_head.weight is m.tok_emb.weight
