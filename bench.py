"""
Benchmarks: speed and memory of nanoCPO against a baseline measured in the same process.
Every number printed is a ratio against that baseline, so the machine's speed cancels out.

    python bench.py model       # forward+backward and greedy decoding vs transformers
    python bench.py loss        # peak memory of the three log-prob paths
    python bench.py negatives   # autoregressive-negative throughput vs transformers' sampling
    python bench.py train       # one CPO step (K = 12) vs one MLE step; with activation checkpointing;
                                # the shared-prompt CPO step vs the naive one
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import negatives
from decoding import generate, left_pad, prefill
from hf import config_from_hf, from_hf_state_dict, save_pretrained
from model import ModelConfig, Transformer, positions_and_mask


def timeit(fn, warmup=1, repeat=3):
    """Best wall time of `repeat` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_mb(field):
    """"VmRSS" (resident now) or "VmHWM" (high-water mark since the last reset) of this process, in MB."""
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024


def _reset_peak_rss():
    """Reset this process's resident high-water mark (Linux clear_refs 5): tracemalloc can't see torch's
    allocations and ru_maxrss is inherited across fork/exec, so the benches read VmHWM - VmRSS instead."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_mb("VmRSS")


# ----------------------------------------------------------------------------- model
def bench_model():
    """GPT-2-small-shaped random model, CPU float32: ours vs transformers on the same weights, same process.
    forward+backward (8 x 256 tokens, cross-entropy) and greedy decoding (64 new tokens) at batch 1 and 8;
    batch-1 decoding against the weights-read bound (parameter bytes / measured memory bandwidth)."""
    import transformers  # only the benchmarks need it
    # no dropout in either model; no EOS, so both decode all 64 tokens
    hf_cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    cfg = config_from_hf(hf_cfg.to_dict())
    ours = Transformer(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    V, n_new = cfg.vocab_size, 64
    print(f"model bench: GPT-2-small shape, random weights, CPU float32, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} (other processes' load skews these timings)")
    print(f"{'':34s} {'ours':>10s} {'transformers':>13s} {'ratio':>7s}  target")

    def race(ours_fn, hf_fn, repeat):
        """Best times of ours_fn and hf_fn, run alternately after one warmup each, so a change in the
        machine's load hits both alike."""
        ours_fn()
        hf_fn()
        best = [float("inf")] * 2
        for _ in range(repeat):
            for j, fn in enumerate((ours_fn, hf_fn)):
                t0 = time.perf_counter()
                fn()
                best[j] = min(best[j], time.perf_counter() - t0)
        return best

    x = torch.randint(V, (8, 257))

    def fwd_bwd(model, logits_of):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits_of(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
    t_ours, t_hf = race(lambda: fwd_bwd(ours, ours), lambda: fwd_bwd(hf, lambda i: hf(i).logits), repeat=2)
    print(f"{'fwd+bwd 8x256, s (ours/HF time)':34s} {t_ours:10.2f} {t_hf:13.2f} {t_ours / t_hf:7.2f}  <= 0.9",
          flush=True)
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)

    hf.eval()
    per_token = {}
    for B in (1, 8):
        p = torch.randint(V, (B, 16))
        t_ours, t_hf = race(lambda: generate(ours, p, n_new, temperature=0),
                            lambda: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n_new,
                                                do_sample=False, pad_token_id=0), repeat=3)
        per_token[B] = t_ours / n_new, t_hf / n_new
        r = t_hf / t_ours
        print(f"{f'greedy B={B}, new tok/s (ours/HF)':34s} {B * n_new / t_ours:10.1f} "
              f"{B * n_new / t_hf:13.1f} {r:7.2f}  >= {3 if B == 1 else 2}", flush=True)

    # the bound: every weight is read once per step at the best bandwidth we can measure (read-only sum
    # or copy, whichever is faster)
    big = torch.randn(64 * 2**20)
    dst = torch.empty_like(big)
    n_bytes = big.numel() * 4
    bw = max(n_bytes / timeit(big.sum, repeat=5), 2 * n_bytes / timeit(lambda: dst.copy_(big), repeat=5))
    param_bytes = sum(q.numel() * q.element_size() for q in ours.parameters())
    bound = param_bytes / bw
    ours_1, hf_1 = per_token[1]
    print(f"weights-read bound: {param_bytes / 1e6:.0f} MB / {bw / 1e9:.1f} GB/s = "
          f"{bound * 1e3:.1f} ms/token; ours at B=1: {ours_1 * 1e3:.1f} ms/token = "
          f"{ours_1 / bound:.2f}x the bound (target <= 1.5)")
    print(f"transformers at B=1: {hf_1 * 1e3:.1f} ms/token = {hf_1 / bound:.2f}x the bound, so no float32 "
          f"decoder that reads every weight once per token can be more than {hf_1 / bound:.2f}x faster at "
          "batch 1")

# ----------------------------------------------------------------------------- loss
def _loss_worker(path, N=12, T=512, V=50257, C=768):
    """Run one log-prob path (forward + backward of the summed log-probs) in THIS process and print
    'peak_MB inputs_MB seconds'. bench_loss starts a fresh interpreter per path, so no path sees
    another's memory."""
    import cpo
    torch.manual_seed(0)
    labels, mask = torch.randint(V, (N, T)), torch.ones(N, T, dtype=torch.bool)  # every position scored
    paths = {
        "naive": lambda x: (x.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
                            * mask).sum(-1),
        "chunked": lambda x: cpo.sequence_logprobs_chunked(x, labels, mask),
        "inplace": lambda x: cpo.sequence_logprobs_chunked(x, labels, mask, inplace_backward=True),
        "hidden": lambda h, w: cpo.sequence_logprobs_from_hidden(h, w, labels, mask),
    }

    # Memory: tracemalloc can't see torch's allocations and ru_maxrss is inherited across fork/exec,
    # so we reset this process's RSS high-water mark (clear_refs 5) and read VmHWM - VmRSS: real
    # resident bytes, everything the path allocates, torch's temporaries included. The inputs are made
    # inside the measured window in every path (the (N, T, V) logits are the model's output, so they
    # count, as do hidden + W for the hidden path), and so are their gradients.
    base = _reset_peak_rss()
    if path == "hidden":
        inputs = torch.randn(N, T, C).requires_grad_(), torch.randn(V, C).mul_(0.02).requires_grad_()
    else:
        inputs = (torch.randn(N, T, V).requires_grad_(),)

    def step():  # autograd.grad hands the gradients back as they are (no .grad accumulation copies)
        return torch.autograd.grad(paths[path](*inputs).sum(), inputs)
    t0 = time.perf_counter()
    grads = step()
    secs = time.perf_counter() - t0
    peak = _rss_mb("VmHWM") - base
    del grads
    inputs_mb = sum(x.numel() * x.element_size() for x in inputs) / 2**20
    if path != "hidden":  # its four (6144 x 768 x 50257) matmuls take a minute on CPU: timed once
        secs = timeit(step, warmup=0, repeat=2)  # the call above was the warmup
    print(f"{peak:.1f} {inputs_mb:.1f} {secs:.3f}")


def bench_loss():
    """Peak memory and time of forward+backward of the three log-prob paths vs naive log_softmax+gather."""
    rows = [("naive", "naive log_softmax + gather"),
            ("chunked", "chunked logits (cpo.sequence_logprobs_chunked)"),
            ("inplace", "chunked logits, inplace_backward=True"),
            ("hidden", "hidden states, C=768 (from_hidden)")]
    here = os.path.dirname(os.path.abspath(__file__))
    print("log-prob paths, forward+backward of sum(log p): N=12 x T=512 x V=50257, float32, CPU, every "
          "position")
    print("scored. Each path runs in a fresh process. peak = growth of resident memory, counting the inputs")
    print("(the logits are the model's output: they exist in both logits paths) and the returned gradients;")
    print("'above inputs' subtracts the inputs. The hidden path's time includes the lm_head matmuls.")
    print(f"{'path':40s} {'peak MB':>8s} {'vs naive':>8s} {'above inputs MB':>16s} {'vs naive':>8s} "
          f"{'time s':>7s} {'vs naive':>8s}")
    naive = None
    for key, name in rows:
        cmd = [sys.executable, "-c", f"import bench; bench._loss_worker({key!r})"]
        out = subprocess.run(cmd, cwd=here, capture_output=True, text=True, check=True).stdout
        mb, inputs_mb, secs = map(float, out.split()[-3:])
        naive = naive or (mb, mb - inputs_mb, secs)
        print(f"{name:40s} {mb:8.0f} {mb / naive[0]:8.1%} {mb - inputs_mb:16.0f} "
              f"{(mb - inputs_mb) / naive[1]:8.1%} {secs:7.2f} {secs / naive[2]:7.2f}x", flush=True)
    print("targets: chunked logits <= 25% of naive peak at <= 1.2x its time; hidden states <= 10% of naive "
          "peak")


# ----------------------------------------------------------------------------- negatives
@torch.no_grad()
def _bare_sampling_loop(model, idx, mask, new_tokens, top_k, generator):
    """A reference point for any eager PyTorch sampler on a GPT-2: the same kernels as decoding.generate
    (linear, layer norm, SDPA, gelu, top-k and an exponential race) called in one flat loop, with no modules,
    no checks and no end-of-sequence bookkeeping. If generate is as fast as this, what is left to gain is in
    the kernels themselves, not in Python."""
    cfg, (B, T) = model.config, idx.shape
    nh, hd, C = cfg.n_head, cfg.head_dim, cfg.n_embd
    pos, bool_mask = positions_and_mask(mask, T + new_tokens)
    logits, caches = prefill(model, idx, pos, bool_mask)                       # the prompt, as generate does
    blocks = [(b.norm1, b.attn.qkv, b.attn.proj, b.norm2, b.mlp.fc, b.mlp.proj) for b in model.blocks]
    for t in range(new_tokens - 1):
        top, index = logits.topk(top_k, dim=-1)
        p = top.softmax(-1)
        noise = torch.empty_like(p).exponential_(1, generator=generator)
        tok = index.gather(-1, (p / noise).argmax(-1, keepdim=True))
        c = T + t
        x = F.embedding(tok, model.tok_emb.weight) + F.embedding(pos[:, c:c + 1], model.pos_emb.weight)
        for (n1, qkv, proj, n2, fc, out), (k_cache, v_cache) in zip(blocks, caches):
            h = F.layer_norm(x, (C,), n1.weight, n1.bias, n1.eps)
            qkv_h = F.linear(h, qkv.weight, qkv.bias).view(B, 1, 3 * nh, hd).transpose(1, 2)
            q, k, v = qkv_h.split(nh, dim=1)
            k_cache[:, :, c:c + 1], v_cache[:, :, c:c + 1] = k, v
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :c + 1], v_cache[:, :, :c + 1],
                                               attn_mask=bool_mask[:, :, c:c + 1, :c + 1])
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), proj.weight, proj.bias)
            h = F.layer_norm(x, (C,), n2.weight, n2.bias, n2.eps)
            hidden = F.gelu(F.linear(h, fc.weight, fc.bias), approximate="tanh")
            x = x + F.linear(hidden, out.weight, out.bias)
        x = F.layer_norm(x[:, -1], (C,), model.norm_f.weight, model.norm_f.bias, model.norm_f.eps)
        logits = F.linear(x, model.lm_head.weight)


def bench_negatives(B=32, new_tokens=64, top_k=50):
    """AN throughput (new tokens/s): negatives.autoregressive_negatives (our KV-cache generate) vs
    transformers' generate(do_sample=True, top_k=50), same random weights, same left-padded prompts.
    The model has the shape of config/default.py's CPU model (GPT-2, 4 x 128, byte vocabulary), with
    room for 24 + 64 positions. One thread: a batch-32 decoding step of this size is too small to split
    (with two threads on a busy 2-core machine, both sides slow down ~10x and the ratio is noise)."""
    import transformers  # only the benchmarks need it
    cfg = ModelConfig(vocab_size=257, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, n_inner=512,
                      max_seq_len=128, bos_id=None, eos_id=256)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(torch.randint(8, 25, (1,), generator=g)),), generator=g).tolist()
               for _ in range(B)]  # 8..24 tokens: left padding matters
    idx, mask = left_pad(prompts, cfg.eos_id)

    def run_ours():
        negatives.autoregressive_negatives(ours, prompts, 1, top_k=top_k, max_new_tokens=new_tokens,
                                           eos_id=cfg.eos_id, generator=torch.Generator().manual_seed(1))

    def run_bare():
        _bare_sampling_loop(ours, idx, mask, new_tokens, top_k, torch.Generator().manual_seed(1))

    def run_hf():
        with torch.no_grad():
            out = hf.generate(idx, attention_mask=mask, do_sample=True, top_k=top_k, top_p=1.0,
                              temperature=1.0, max_new_tokens=new_tokens, eos_token_id=cfg.eos_id,
                              pad_token_id=cfg.eos_id)
        # all steps ran (a whole batch stopping is ~impossible)
        assert out.shape[1] == idx.shape[1] + new_tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # alternate the two so a change in machine load hits both alike
        t_ours = t_hf = t_bare = float("inf")
        for _ in range(5):
            t_hf, t_ours = min(t_hf, timeit(run_hf, repeat=1)), min(t_ours, timeit(run_ours, repeat=1))
            t_bare = min(t_bare, timeit(run_bare, repeat=1))
    finally:
        torch.set_num_threads(threads)
    tok = B * new_tokens  # decoded positions: both loops run every step while any row is unfinished
    print(f"AN sampling: random GPT-2 4 x 128, vocab 257, batch {B}, prompts 8-24 tokens left-padded, "
          f"top-k {top_k}, {new_tokens} new tokens, float32, 1 CPU thread")
    for name, t in [("ours (negatives.autoregressive_negatives)", t_ours),
                    ("transformers generate(do_sample, top_k=50)", t_hf),
                    ("bare loop of the same kernels", t_bare)]:
        print(f"{name:44s} {tok / t:7.0f} new tokens/s {1e3 * t / new_tokens:6.1f} ms/step")
    print(f"ours / transformers: {t_hf / t_ours:.2f}x   (target >= 2); "
          f"bare loop / transformers: {t_hf / t_bare:.2f}x")

# ----------------------------------------------------------------------------- train
def _train_worker(mode, B=16):
    """One optimisation step in THIS process (forward, backward, AdamW) of the default CPU model on B
    synthetic examples: 'mle' on the B*K sequences of a CPO batch, or 'cpo' (MixNR, K = 12) with the
    reference log-probs computed in the step or already cached, or 'cpo_checkpointed' (cached, each block's
    activations recomputed in the backward: train.py --activation_checkpointing). Prints 'peak_MB seconds'."""
    import data
    import train
    torch.manual_seed(0)
    # fixed negatives: BN and TN come back every step, so 'cpo_cached' finds them in the reference cache
    cfg = train.Config(objective="mle" if mode == "mle" else "cpo", negatives="bn:3,mn:5,tn:3", ranked=True,
                       fixed_negatives=True)
    policy, tok = train.build_model(cfg)
    ref = train.frozen_copy(policy)
    policy.checkpoint_blocks = mode == "cpo_checkpointed"
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=B, seed=0)
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id,
                       ref_cache=None if mode == "cpo_computed" else train.scoring.ReferenceCache())
    ids, mask, _, _ = train.cpo_batch(cfg, policy, ref, examples, rt)
    ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)  # (B*K, T): the MLE step sees the same sequences
    optimizer = train.make_optimizer(policy, cfg, rt.device)

    def step():
        if mode == "mle":
            loss = -train.sequence_logps(policy, ids, mask).sum() / mask[:, 1:].sum()
        else:
            loss = train.cpo_objective(cfg, policy, ref, examples, rt)[0] / B
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base = _reset_peak_rss()  # before any forward pass: later steps reuse memory the first one made resident
    # the negatives are fixed, so a run scores each sequence under pi_ref once
    if mode in ("cpo_cached", "cpo_checkpointed"):
        with torch.no_grad():
            train.cpo_objective(cfg, policy, ref, examples, rt)
    secs = timeit(step, warmup=1, repeat=3)
    print(f"{_rss_mb('VmHWM') - base:.1f} {secs:.3f}")


def bench_train():
    """A CPO step (K = 12, MixNR) with the reference's log-probs cached or computed, and with activation
    checkpointing, against an MLE step on the same B*K sequences: time and peak memory, each in a fresh
    process."""
    here = os.path.dirname(os.path.abspath(__file__))
    print("one step (forward, backward, AdamW) of the default CPU model (4 x 128, byte vocabulary), 16 "
          "synthetic")
    print("examples x K = 12 sequences, float32; peak = growth of resident memory from before the first step")
    print(f"{'step':42s} {'time s':>7s} {'vs MLE':>7s} {'peak MB':>8s} {'vs MLE':>7s}")
    rows = [("mle", "MLE on the same 192 sequences"), ("cpo_cached", "CPO, reference log-probs cached"),
            ("cpo_computed", "CPO, reference log-probs computed"),
            ("cpo_checkpointed", "CPO, cached, activation checkpointing")]
    mle = None
    for key, name in rows:
        cmd = [sys.executable, "-c", f"import bench; bench._train_worker({key!r})"]
        out = subprocess.run(cmd, cwd=here, capture_output=True, text=True, check=True).stdout
        mb, secs = map(float, out.split()[-2:])
        mle = mle or (mb, secs)
        print(f"{name:42s} {secs:7.3f} {secs / mle[1]:6.2f}x {mb:8.1f} {mb / mle[0]:6.2f}x", flush=True)
    print()
    shared_prompt_table()


def _shared_prompt_worker(mode, P, S, B=1, K=12):
    """One CPO step (eq. (1), forward, backward, AdamW) in THIS process of a random GPT-2-small-shaped model
    (12 x 768, vocabulary 50257) on B examples x K continuations, prompts of P tokens, continuations of S,
    the policy scored by the shared-prompt forward ('shared') or every sequence whole ('naive'); the reference
    log-probs are cached (as in a run after each sequence's first visit). A warm-up step on a tiny batch makes
    AdamW's state first. Prints 'peak_MB seconds': growth of resident memory over the timed step."""
    import cpo
    import scoring
    import train
    torch.manual_seed(0)
    policy = Transformer(ModelConfig())
    optimizer = train.make_optimizer(policy, train.Config(), torch.device("cpu"))

    def batch(P, S):  # (B, K, P + S): each example's prompt repeated in its K rows, as negatives lays out
        g = torch.Generator().manual_seed(P * 1000 + S)
        prompts = torch.randint(policy.config.vocab_size, (B, 1, P), generator=g).expand(B, K, P)
        ids = torch.cat([prompts, torch.randint(policy.config.vocab_size, (B, K, S), generator=g)], dim=-1)
        return ids, torch.arange(P + S) >= P

    def step(ids, mask):
        mask = mask.expand(ids.shape)
        if mode == "shared":
            logps = scoring.shared_prompt_logps(policy, ids, mask)                         # (B, K)
        else:
            logps = train.sequence_logps(policy, ids.flatten(0, 1), mask.flatten(0, 1)).view(B, K)
        cpo.cpo_loss(logps, torch.zeros_like(logps))[0].mean().backward()  # per-example losses: their mean
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batch(4, 4))
    ids, mask = batch(P, S)
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    step(ids, mask)
    print(f"{_rss_mb('VmHWM') - base:.1f} {time.perf_counter() - t0:.3f}")


def shared_prompt_table(shapes=((100, 100), (400, 60), (77, 435))):
    """The shared-prompt CPO step against the naive one on the same examples, each in a fresh process."""
    here = os.path.dirname(os.path.abspath(__file__))
    print("one CPO step (forward, backward, AdamW), GPT-2-small shape (random), 1 example x K = 12, "
          "float32, CPU,")
    print(f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}; reference log-probs "
          "cached; peak = growth of resident memory in the step")
    print(f"{'prompt / answer tokens':24s} {'naive s':>8s} {'shared s':>9s} {'ratio':>6s} {'naive MB':>9s} "
          f"{'shared MB':>10s} {'ratio':>6s}")
    for P, S in shapes:
        res = {}
        for mode in ("naive", "shared"):
            cmd = [sys.executable, "-c", f"import bench; bench._shared_prompt_worker({mode!r}, {P}, {S})"]
            out = subprocess.run(cmd, cwd=here, capture_output=True, text=True, check=True).stdout
            res[mode] = tuple(map(float, out.split()[-2:]))  # (MB, seconds)
        (mb_n, t_n), (mb_s, t_s) = res["naive"], res["shared"]
        print(f"{f'{P} / {S}':24s} {t_n:8.2f} {t_s:9.2f} {t_s / t_n:5.2f}x {mb_n:9.0f} {mb_s:10.0f} "
              f"{mb_s / mb_n:5.2f}x", flush=True)
    print("target at 100 / 100: time <= 0.65x, peak memory <= 0.75x the naive step")


if __name__ == "__main__":
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", metavar="BENCH", help=f"{' | '.join(benches)} (default: all)")
    which = parser.parse_args().which or list(benches)
    for name in which:
        if name not in benches:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(benches)}")
        torch.manual_seed(0)
        benches[name]()
