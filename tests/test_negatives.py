"""negatives.py: the four samplers, the spec, the assembled batch, ranking and the offline AN tool."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from scipy.stats import chisquare

import negatives
from cpo import batch_negatives, truncation_negatives  # TN and BN: pure functions, in cpo.py
from negatives import (autoregressive_negatives, build_cpo_batch, load_an_cache, make_generator,
                       meanfield_negatives, parse_spec, rank_by_similarity)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, EOS = 20, 19  # the hand-made model's vocabulary


class BigramPositionModel(nn.Module):
    """Known conditionals: logits of token t+1 = table_tok[token t] + table_pos[t]. Depends on the prefix
    (through the last token) and on the position, so an off-by-one in MN shows up."""

    def __init__(self, max_t=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(eos_id=EOS, max_seq_len=max_t)
        self.max_t = max_t
        self.lm_head = nn.Linear(V + max_t, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(2 * torch.randn(V, V + max_t, generator=g))

    def forward(self, idx, return_hidden=False):
        B, T = idx.shape
        pos = torch.arange(T).expand(B, T)
        h = torch.cat([nn.functional.one_hot(idx, V), nn.functional.one_hot(pos, self.max_t)], -1).float()
        return h if return_hidden else self.lm_head(h)


@dataclass
class Ex:  # the fields of data.Example that negatives.py reads
    id: str
    prompt_ids: list
    continuation_ids: list


def random_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, EOS, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(0, EOS, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        out.append(Ex(f"ex{i}", p, c + [EOS]))
    return out

# ----------------------------------------------------------------------------- spec


def test_parse_spec():
    assert parse_spec("an:11") == [("an", 11)]
    assert parse_spec("bn:3,mn:5,tn:3") == [("bn", 3), ("mn", 5), ("tn", 3)]
    assert parse_spec(" BN:4 , tn:2") == [("bn", 4), ("tn", 2)]
    for bad in ["", "xn:3", "bn", "bn:0", "bn:-1", "bn:x", "bn:3,bn:2", "bn:3,,tn:2"]:
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_make_generator_depends_only_on_its_keys():
    draw = lambda *keys: torch.randint(0, 2**30, (4,), generator=make_generator(*keys)).tolist()  # noqa: E731
    assert draw(0, "ex1", "tn") == draw(0, "ex1", "tn")
    assert len({str(draw(0, "ex1", "tn")), str(draw(1, "ex1", "tn")), str(draw(0, "ex2", "tn")),
                str(draw(0, "ex1", "mn"))}) == 4

# ----------------------------------------------------------------------------- TN


def test_truncation_is_strict_prefix_plus_eos_and_uniform():
    cont = list(range(11)) + [EOS]  # L = 11 tokens before EOS -> cuts k in {1..10}
    negs = truncation_negatives(cont, 2000, EOS, torch.Generator().manual_seed(0))
    assert len(negs) == 2000
    for neg in negs:
        k = len(neg) - 1
        assert 1 <= k < 11 and neg[:k] == cont[:k] and neg[-1] == EOS and neg.count(EOS) == 1
    counts = torch.bincount(torch.tensor([len(n) - 1 for n in negs]), minlength=11)[1:]
    assert (counts > 0).all()
    assert chisquare(counts.numpy()).pvalue > 0.01


def test_truncation_one_token_continuations():
    assert truncation_negatives([EOS], 3, EOS) == []  # nothing strictly shorter: no negatives
    assert truncation_negatives([5, EOS], 3, EOS) == [[EOS]] * 3  # the only strictly shorter one
    assert truncation_negatives([5, 6, EOS], 2, EOS) == [[5, EOS]] * 2

# ----------------------------------------------------------------------------- MN


def test_meanfield_resamples_exactly_ceil_fraction_positions():
    model = BigramPositionModel()
    with torch.no_grad():
        model.lm_head.weight[0] = -1e4  # token 0 is never sampled...
    exs = random_examples(6, seed=1)
    for e in exs:  # ...and every ground-truth continuation token is 0: each resampled position changes
        e.continuation_ids = [0] * (len(e.continuation_ids) - 1) + [EOS]
    exs.append(Ex("bare", [3], [EOS]))  # nothing eligible: the negatives equal the ground truth
    ids, mask = negatives.pad_right([e.prompt_ids for e in exs], [e.continuation_ids for e in exs], EOS)
    out = meanfield_negatives(model, ids, mask, 50, 0.15, torch.Generator().manual_seed(0))  # (N, n, T)
    assert out.shape == (len(exs), 50, ids.shape[1])
    for i, e in enumerate(exs):
        p, c = len(e.prompt_ids), len(e.continuation_ids)
        m = math.ceil(0.15 * (c - 1))  # T_cont = continuation tokens before the final EOS
        for neg in out[i]:
            assert neg[:p].tolist() == e.prompt_ids                     # prompt never touched
            assert neg[p + c - 1] == EOS and neg[p + c:].eq(EOS).all()  # final EOS and padding kept
            assert (neg[p:p + c - 1] != EOS).all()                       # no EOS inside
            assert (neg != ids[i]).sum().item() == m


@pytest.mark.parametrize("position", [4, 9])
def test_meanfield_samples_follow_the_models_conditional(position):
    model = BigramPositionModel(seed=3)
    ex = random_examples(1, seed=4)[0]
    ex.prompt_ids, ex.continuation_ids = [1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, EOS]
    ids, mask = negatives.pad_right([ex.prompt_ids], [ex.continuation_ids], EOS)
    n = 4000
    out = meanfield_negatives(model, ids, mask, n, 1.0, torch.Generator().manual_seed(1))  # every position
    # the conditional of token `position` given the true prefix
    logits = model(ids)[0, position - 1].detach().double()
    logits[EOS] = float("-inf")  # MN never draws EOS: renormalised without it
    expected = logits.softmax(-1) * n
    counts = torch.bincount(out[0, :, position], minlength=V).double()
    keep = expected > 5  # chi-square needs expected counts >= 5: pool the rest into one cell
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)]).double()
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 0.01
    assert (out[0, :, :3] == ids[0, :3]).all()

# ----------------------------------------------------------------------------- BN


def test_batch_negatives_never_own_nor_identical():
    conts = [[1, EOS], [2, EOS], [1, EOS], [3, 4, EOS], [2, EOS], [5, EOS]]
    for seed in range(20):
        out = batch_negatives(conts, 2, torch.Generator().manual_seed(seed))
        for own, negs in zip(conts, out):
            assert len(negs) == 2 and own not in negs and negs[0] != negs[1]
    with pytest.raises(ValueError, match="distinct other continuations"):
        batch_negatives(conts, 4)  # row 0 has only {2}, {3,4}, {5} as distinct others
    out = batch_negatives(conts, 4, allow_fewer=True)
    assert [len(r) for r in out] == [3] * 6
    with pytest.raises(ValueError):
        batch_negatives([[1, EOS]], 1)

# ----------------------------------------------------------------------------- ranking


def test_rank_by_similarity():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 6, 8, generator=g)
    emb[0, 4] = emb[0, 0] * 3  # identical direction to the ground truth: most similar negative
    emb[1, 0] = -emb[1, 2]  # the ground truth itself is the least similar to ... nothing: still first
    emb[2, 1:] = emb[2, 1]  # all negatives tie: column order
    order = rank_by_similarity(emb)
    assert (order[:, 0] == 0).all()
    assert order[0, 1] == 4
    assert order[2].tolist() == [0, 1, 2, 3, 4, 5]
    sim = torch.nn.functional.cosine_similarity(emb, emb[:, :1], dim=-1)
    for b in range(3):
        s = sim[b, order[b, 1:]]
        assert (s[:-1] >= s[1:]).all()  # most similar first
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 4] = False
    assert rank_by_similarity(emb, valid)[0, -1] == 4  # invalid columns go last

# ----------------------------------------------------------------------------- the assembled batch


def check_batch(exs, input_ids, cont_mask, valid, K, eos=EOS):
    B, T = len(exs), input_ids.shape[-1]
    assert input_ids.shape == cont_mask.shape == (B, K, T) and valid.shape == (B, K)
    for b, e in enumerate(exs):
        p = len(e.prompt_ids)
        gt = input_ids[b, 0][cont_mask[b, 0]].tolist()
        assert gt == e.continuation_ids and valid[b, 0]
        for k in range(K):
            assert input_ids[b, k, :p].tolist() == e.prompt_ids and not cont_mask[b, k, :p].any()
            pos = cont_mask[b, k].nonzero().squeeze(1)
            assert (pos == torch.arange(p, p + len(pos))).all()  # one contiguous span after the prompt
            cont = input_ids[b, k, pos].tolist()
            assert cont[-1] == eos and cont.count(eos) == 1  # exactly one EOS, at the end
            assert (input_ids[b, k, p + len(pos):] == eos).all()  # right-padded with pad_id
            if k > 0:
                assert valid[b, k] == (cont != gt)


def test_build_cpo_batch_mixn_and_seeding():
    model = BigramPositionModel()
    exs = random_examples(8, seed=2) + [Ex("bare", [4], [EOS])]
    spec = "bn:3,mn:5,tn:3"
    out = build_cpo_batch(exs, spec, model, EOS, EOS, torch.Generator().manual_seed(0))
    check_batch(exs, *out[:3], K=12)
    assert out[2][-1].tolist() == [True] * 4 + [False] * 8  # bare EOS: BN fine, MN == gt, TN impossible
    again = build_cpo_batch(exs, spec, model, EOS, EOS, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    # per-example seeds: an example's MN/TN negatives don't depend on which batch (rank) it lands in
    half = build_cpo_batch(exs[3:6], "mn:5,tn:3", model, EOS, EOS, torch.Generator().manual_seed(0))
    full = build_cpo_batch(exs, "mn:5,tn:3", model, EOS, EOS, torch.Generator().manual_seed(0))
    for j, b in enumerate(range(3, 6)):
        for k in range(9):
            assert half[0][j, k][half[1][j, k]].tolist() == full[0][b, k][full[1][b, k]].tolist()


def test_build_cpo_batch_ranked_and_cache():
    model = BigramPositionModel()
    exs = random_examples(4, seed=5)
    cache = {e.id: [e.continuation_ids, [7, EOS], [8, 9, EOS]] for e in exs}  # first one == gt
    ids, mask, valid, cacheable = build_cpo_batch(exs, "an:3,tn:2", model, EOS, EOS,
                                                  torch.Generator().manual_seed(0), an_cache=cache,
                                                  ranked=True)
    check_batch(exs, ids, mask, valid, K=6)
    # which log pi_ref may be cached: the truth and the cached AN, wherever ranking put them; TN, drawn afresh
    # each step, only with fixed negatives
    comes_back = {tuple(c) for e in exs for c in cache[e.id]}  # the truths and the cached AN
    for b in range(4):
        for k in range(6):
            if valid[b, k]:  # an invalid column holds a copy of the truth
                assert bool(cacheable[b, k]) == (tuple(ids[b, k][mask[b, k]].tolist()) in comes_back)
    fixed = build_cpo_batch(exs, "an:3,tn:2", model, EOS, EOS, torch.Generator().manual_seed(0),
                            an_cache=cache, ranked=True, fixed_negatives=True)
    assert fixed[3].all()
    emb = negatives.mean_pooled_embedding(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(4, 6, -1)
    for b in range(4):
        assert ids[b, 0][mask[b, 0]].tolist() == exs[b].continuation_ids  # ground truth first
        assert not valid[b, -1]  # the cached copy of the ground truth is invalid and ranked last
        sim = torch.nn.functional.cosine_similarity(emb[b, 1:-1], emb[b, :1], dim=-1)
        assert (sim[:-1] >= sim[1:]).all()
    with pytest.raises(ValueError, match="cache holds 3"):
        build_cpo_batch(exs, "an:4", model, EOS, EOS, an_cache=cache)
    with pytest.raises(KeyError):
        build_cpo_batch(exs + [Ex("new", [1], [2, EOS])], "an:1", model, EOS, EOS, an_cache=cache)

# ----------------------------------------------------------------------------- AN (the real model)
import decoding  # noqa: E402
import hf  # noqa: E402
import model as M  # noqa: E402
from tokenizer import byte_tokenizer  # noqa: E402

TEOS = 256  # the tiny real model's EOS (byte_tokenizer's <|endoftext|>)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]  # different lengths: left padding


def tiny_model(seed=0, dtype=torch.float64, vocab_size=300):
    """A random 2-layer GPT-2 over byte_tokenizer's 257 ids (+ unused ones) whose EOS is likely enough
    that some rows stop early and some don't. float64: the cached and uncached paths agree to ~1e-15,
    so no sample can flip between them."""
    torch.manual_seed(seed)
    cfg = M.ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, n_inner=64,
                        max_seq_len=64, tie_word_embeddings=False, bos_id=None, eos_id=TEOS)
    model = M.Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0  # a constant direction in the final hidden state...
        model.lm_head.weight[TEOS] = 0
        model.lm_head.weight[TEOS, 0] = 2.5  # ...that raises EOS's logit
    return model


def reference_sampler(model, prompts, max_new_tokens, top_k, generator):
    """No KV cache, no padding: each row's full logits recomputed from scratch every step, stacked,
    then decoding.sample_next_token on the whole batch, as generate draws its random stream."""
    rows, done = [list(p) for p in prompts], [False] * len(prompts)
    out = torch.full((len(prompts), max_new_tokens), TEOS)
    for t in range(max_new_tokens):
        logits = torch.empty(len(rows), model.config.vocab_size, dtype=torch.float64)  # (B, V)
        for n in set(map(len, rows)):  # rows of one length share a forward (no padding needed)
            same = [i for i, r in enumerate(rows) if len(r) == n]
            logits[same] = model(torch.tensor([rows[i] for i in same]))[:, -1]
        tok = decoding.sample_next_token(logits, 1.0, top_k, None, generator)
        for i, x in enumerate(tok.tolist()):
            rows[i].append(x)
            if not done[i]:
                out[i, t] = x
                done[i] = x == TEOS
    return out


def test_an_top50_stops_at_eos_and_ends_with_one_eos():
    model, n, new = tiny_model(), 6, 12
    out = autoregressive_negatives(model, PROMPTS, n, max_new_tokens=new,
                                   generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in out] == [n] * len(PROMPTS)
    lengths = []
    with torch.no_grad():
        for prompt, conts in zip(PROMPTS, out):
            for c in conts:
                assert c[-1] == TEOS and c.count(TEOS) == 1 and len(c) <= new
                lengths.append(len(c))
                seq = torch.tensor([prompt + c])
                logits = model(seq)[0, len(prompt) - 1:-1]  # full forward, no cache: (len(c), V)
                kth = logits.topk(50, dim=-1).values[:, -1]
                sampled = logits.gather(1, seq[0, len(prompt):, None]).squeeze(1)
                # every sampled token is inside the top 50 at its step (the final EOS of a row that hit
                # max_new_tokens was appended, not sampled)
                m = len(c) if len(c) < new else new - 1
                assert (sampled[:m] >= kth[:m]).all()
    assert min(lengths) < new and max(lengths) == new  # some rows stopped, some ran to the limit


def test_an_generate_pads_after_eos_and_matches_no_cache_reference():
    model, new = tiny_model(), 16
    prompts = [p for p in PROMPTS for _ in range(3)]
    idx, mask = negatives.left_pad(prompts, TEOS)
    out = decoding.generate(model, idx, new, attention_mask=mask, top_k=50, eos_id=TEOS,
                            generator=torch.Generator().manual_seed(7))
    ref = reference_sampler(model, prompts, new, 50, torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)
    stopped = 0
    for row in out.tolist():
        if TEOS in row:
            stopped += 1
            assert all(x == TEOS for x in row[row.index(TEOS):])  # padded (pad_id = EOS) after its EOS
    assert 0 < stopped < len(prompts)
    # autoregressive_negatives is this generate, cut at EOS (or cut + EOS when it never came)
    an = autoregressive_negatives(model, PROMPTS, 3, max_new_tokens=new,
                                  generator=torch.Generator().manual_seed(7))
    flat = [c for conts in an for c in conts]
    assert flat == [negatives.end_with_eos(row, TEOS) for row in out.tolist()]


def test_an_same_seed_same_output():
    model = tiny_model(dtype=torch.float32)
    run = lambda s, bs=None: autoregressive_negatives(model, PROMPTS, 4, max_new_tokens=10, batch_size=bs,  # noqa: E731
                                                      generator=torch.Generator().manual_seed(s))
    assert run(0) == run(0) and run(0) != run(1)
    assert run(3, bs=5) == run(3, bs=5)
    assert negatives.end_with_eos([5, 6, 7], TEOS) == [5, 6, TEOS]
    assert negatives.end_with_eos([5, TEOS, TEOS], TEOS) == [5, TEOS]

def test_build_cpo_batch_real_model_all_kinds_ranked():
    model = tiny_model(dtype=torch.float32)
    exs = [Ex(f"r{i}", p, [30 + i, 40 + i, 50, TEOS]) for i, p in enumerate(PROMPTS)]
    ids, mask, valid, _ = build_cpo_batch(exs, "an:2,bn:2,mn:2,tn:2", model, TEOS, TEOS,
                                       torch.Generator().manual_seed(0), ranked=True, max_new_tokens=6)
    check_batch(exs, ids, mask, valid, K=9, eos=TEOS)
    emb = negatives.mean_pooled_embedding(model, ids.flatten(0, 1), mask.flatten(0, 1)).view(4, 9, -1)
    sim = torch.nn.functional.cosine_similarity(emb, emb[:, :1], dim=-1)
    for b in range(4):
        s = sim[b, 1:][valid[b, 1:]]
        assert (s[:-1] >= s[1:] - 1e-6).all() and valid[b, 1:].sum() >= 6  # most similar first
        assert not valid[b, 1 + int(valid[b, 1:].sum()):].any()  # invalid ones last

# ----------------------------------------------------------------------------- the offline AN tool


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("an")
    hf.save_pretrained(tiny_model(dtype=torch.float32, vocab_size=257), str(tmp / "model"), byte_tokenizer())
    with open(tmp / "pairs.jsonl", "w") as f:
        for i in range(10):
            pair = {"id": f"p{i}", "prompt": "ab" * (i % 4 + 1) + "=", "response": "xyz"[: i % 3 + 1]}
            f.write(json.dumps(pair) + "\n")
    return tmp


def run_tool(tmp, out, *extra, torchrun=False):
    """The CLI, in this process (python startup is slow here) or as 2 CPU ranks under torchrun."""
    args = ["--model", str(tmp / "model"), "--data", f"jsonl:{tmp / 'pairs.jsonl'}", "--split", "all",
            "--spec", "an:3", "--out", str(tmp / out), "--max-new-tokens", "8", "--batch-size", "4",
            "--shard-size", "3", "--seed", "5", *extra]
    if not torchrun:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            negatives.main(args)
        return buf.getvalue()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "negatives.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def shard_files(d):
    shards = [name for name in sorted(os.listdir(d)) if name.startswith("shard-") and name.endswith(".jsonl")]
    return {name: open(os.path.join(d, name)).read() for name in shards}


def test_offline_tool_resumes_and_matches_uninterrupted_and_torchrun(cli_setup):
    tmp = cli_setup
    log = run_tool(tmp, "full")
    assert "examples/s" in log and "ETA" in log
    full = shard_files(tmp / "full")
    assert list(full) == [f"shard-{i:05d}.jsonl" for i in range(4)]  # 10 examples, 3 per shard
    cache = load_an_cache(str(tmp / "full"))
    assert sorted(cache) == [f"p{i}" for i in range(10)]
    assert all(len(v) == 3 and all(c[-1] == TEOS and c.count(TEOS) == 1 for c in v) for v in cache.values())

    # "crash" after 2 shards: only those exist, the cache refuses to load, a rerun writes only the rest
    run_tool(tmp, "resumed", "--max-shards", "2")
    part = shard_files(tmp / "resumed")
    assert list(part) == list(full)[:2]
    with pytest.raises(ValueError, match="2 of 4 shards missing"):
        load_an_cache(str(tmp / "resumed"))
    (tmp / "resumed" / "shard-00002.jsonl.tmp999").write_text("half a shard from the crash")
    stamps = {n: os.stat(tmp / "resumed" / n).st_mtime_ns for n in part}
    log = run_tool(tmp, "resumed")
    assert "2 done already, 2 to do" in log
    assert {n: os.stat(tmp / "resumed" / n).st_mtime_ns for n in part} == stamps  # not rewritten
    assert shard_files(tmp / "resumed") == full
    assert load_an_cache(str(tmp / "resumed")) == cache

    # two ranks share the shards (i % world == rank): the same negatives as one rank
    run_tool(tmp, "ranks", torchrun=True)
    assert shard_files(tmp / "ranks") == full

    # other settings into the same folder are refused rather than mixed in
    with pytest.raises(SystemExit, match="other settings"):
        run_tool(tmp, "full", "--max-new-tokens", "6")


def test_an_tool_is_a_function_and_refuses_other_kinds(tmp_path):
    # the miniature calls write_an_negatives directly; main() only parses flags into it
    with pytest.raises(ValueError, match="spec must be an:N"):
        negatives.write_an_negatives("no/such/model", "synthetic", str(tmp_path / "an"), spec="bn:3")
    with pytest.raises(SystemExit, match="spec must be an:N"):
        negatives.main(["--model", "no/such/model", "--data", "synthetic", "--spec", "an:2,tn:1",
                        "--out", str(tmp_path / "an")])
