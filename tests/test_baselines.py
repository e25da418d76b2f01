"""The DPO and PSS baselines, and the paper's presets (issue: DPO and PSS baselines and presets)."""
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import data
import hf
import model as modeling
import negatives
import train
from test_train import ROOT, hand_logp, tiny_config
from tokenizer import byte_tokenizer


def tiny_setup(objective, **overrides):
    cfg = tiny_config(objective=objective, **overrides)
    policy, tok = train.build_model(cfg)
    examples = data.load_task("synthetic", "train", tok, cfg.max_len, n=4, seed=0)
    rt = train.Runtime(device=torch.device("cpu"), pad_id=tok.pad_id, eos_id=tok.eos_id)
    return cfg, policy, tok, examples, rt


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def assert_grads_close(a, b):
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")

# ----------------------------------------------------------------------------- DPO

def write_rejected(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_dpo_step_gradient_matches_bradley_terry(tmp_path):
    cfg, policy, tok, examples, rt = tiny_setup("dpo", beta=0.5)
    ref = train.frozen_copy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = write_rejected(tmp_path / "rejected.jsonl", [{"id": e.id, "rejected": e.response[::-1] + "x"} for e in examples])
    rt.rejected = data.load_rejected(path, examples, tok, cfg.max_len)
    loss_sum, _ = train.dpo_objective(cfg, policy, ref, examples, rt, (0, 0))
    (loss_sum / len(examples)).backward()
    ours = grads(policy)

    total = 0
    for e in examples:  # -log sigmoid(beta * ((pc - rc) - (pr - rr))), one example at a time
        chosen, rejected = data.collate([e], tok.pad_id), data.collate([rt.rejected[e.id]], tok.pad_id)
        pc, pr = hand_logp(policy, chosen[0][0], chosen[1][0]), hand_logp(policy, rejected[0][0], rejected[1][0])
        rc, rr = hand_logp(ref, chosen[0][0], chosen[1][0]).detach(), hand_logp(ref, rejected[0][0], rejected[1][0]).detach()
        total = total - F.logsigmoid(cfg.beta * ((pc - rc) - (pr - rr)))
    (total / len(examples)).backward()
    assert_grads_close(ours, grads(policy))


def test_rejected_file_errors_name_file_and_line(tmp_path):
    cfg, policy, tok, examples, rt = tiny_setup("dpo")
    bad = write_rejected(tmp_path / "bad.jsonl", [{"id": examples[0].id, "rejected": "x"}, {"id": examples[1].id}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'rejected'"):
        data.load_rejected(bad, examples, tok, cfg.max_len)
    (tmp_path / "torn.jsonl").write_text('{"id": "a", "rejected": "x"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"torn\.jsonl:2: bad JSON"):
        data.load_rejected(str(tmp_path / "torn.jsonl"), examples, tok, cfg.max_len)
    missing = write_rejected(tmp_path / "missing.jsonl", [{"id": e.id, "rejected": "x"} for e in examples[:-1]])
    with pytest.raises(ValueError, match=rf"missing\.jsonl: no rejected response for example '{examples[-1].id}'"):
        data.load_rejected(missing, examples, tok, cfg.max_len)

# ----------------------------------------------------------------------------- PSS

def test_pss_with_p0_is_exactly_an_mle_step():
    cfg, policy, tok, examples, rt = tiny_setup("pss", pss_p=0.0, pss_samples=3)
    tokens = sum(len(e.continuation_ids) for e in examples)
    pss_loss, _ = train.pss_objective(cfg, policy, None, examples, rt, (0, 0))
    (pss_loss / (cfg.pss_samples * tokens)).backward()
    pss = grads(policy)
    mle_loss, _ = train.mle_objective(cfg, policy, None, examples, rt, (0, 0))
    (mle_loss / tokens).backward()
    torch.testing.assert_close(pss_loss / cfg.pss_samples, mle_loss, atol=1e-5, rtol=1e-6)
    assert_grads_close(pss, grads(policy))


def test_pss_with_p1_feeds_samples_and_trains_on_the_truth(monkeypatch):
    """p = 1: every continuation input token is the first pass's sample (here forced to token 7), the
    prompt is untouched, and the loss is the ground truth's NLL given those mixed inputs, nothing else."""
    cfg, policy, tok, examples, rt = tiny_setup("pss", pss_p=1.0, pss_samples=2)
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: torch.full((len(probs), n), 7))
    seen = []
    policy.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    loss, _ = train.pss_objective(cfg, policy, None, examples, rt, (0, 0))
    loss.backward()
    ours = grads(policy)

    ids, mask = data.collate(examples, tok.pad_id)
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    first, second = seen
    assert torch.equal(first, ids[:, :-1])  # the teacher-forced pass sees the ground truth
    expected = torch.where(mask, 7, ids)[:, :-1]  # every continuation input replaced, prompt kept
    assert torch.equal(second, expected)
    total = -sum(policy(second[i:i + 1])[0].log_softmax(-1)[t, ids[i, t + 1]]
                 for i in range(len(ids)) for t in range(ids.shape[1] - 1) if mask[i, t + 1])
    total.backward()  # the truth's NLL, as a function of the parameters only through the second pass
    torch.testing.assert_close(loss, total, atol=1e-4, rtol=1e-5)
    assert_grads_close(ours, grads(policy))

# ----------------------------------------------------------------------------- presets

PRESETS = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py") and n not in ("paper.py", "default.py", "miniature.py"))


def preset(name):
    config, stages = train.load_preset(os.path.join(ROOT, "config", name + ".py"))
    assert not stages
    return train.Config(**config)


def test_every_run_of_the_paper_has_a_preset():
    runs = {f"dolly_gpt2xl_{m}" for m in ("sft", "mle", "pss", "dpo", "anr", "mixnr")}
    runs |= {f"dolly_llama3b_{m}" for m in ("sft", "mle", "pss", "dpo", "anr", "an", "mixnr", "mixn", "bnr4", "tnr4", "mnr4")}
    runs |= {f"wiki_llama3b_{m}" for m in ("sft", "mle", "bnr")}
    assert set(PRESETS) == runs


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_to_the_papers_numbers(name):
    cfg = preset(name)
    method = name.split("_")[-1]
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.beta) == (1e-5, 0.05, 64, 5.0)
    assert cfg.out_dir == f"out/{name}"
    assert cfg.task.split(":")[0] == name.split("_")[0]
    if method == "sft":
        assert (cfg.objective, cfg.steps) == ("mle", 2000)
        assert cfg.init_from == ("gpt2-xl" if "gpt2xl" in name else "openlm-research/open_llama_3b")
        return
    assert cfg.init_from == f"out/{name.rsplit('_', 1)[0]}_sft/final"  # pi_ref: the SFT model of its row
    assert cfg.steps == (200 if method.endswith("4") else 1000)
    objective = {"mle": "mle", "pss": "pss", "dpo": "dpo"}.get(method, "cpo")
    assert cfg.objective == objective
    if objective == "pss":
        assert (cfg.pss_samples, cfg.pss_p) == (3, 0.5)
    if objective == "cpo":
        n_neg = sum(n for _, n in negatives.parse_spec(cfg.negatives))
        assert n_neg == (4 if method.endswith("4") or name == "wiki_llama3b_bnr" else 11)
        assert cfg.ranked == method.rstrip("4").endswith("r")
        kinds = {k for k, _ in negatives.parse_spec(cfg.negatives)}
        assert kinds == {"an": {"an"}, "anr": {"an"}, "mixn": {"bn", "mn", "tn"}, "mixnr": {"bn", "mn", "tn"},
                         "bnr4": {"bn"}, "tnr4": {"tn"}, "mnr4": {"mn"}, "bnr": {"bn"}}[method]
        if "mix" in method:
            assert negatives.parse_spec(cfg.negatives) == [("bn", 3), ("mn", 5), ("tn", 3)]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny models of each family with the byte tokenizer, Dolly- and Wiki-format files, an AN cache and
    DPO rejected responses for them: what a preset needs, in miniature."""
    tmp = tmp_path_factory.mktemp("presets")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    for family, cfg in {"gpt2": dict(model_type="gpt2"), "llama": dict(model_type="llama", n_kv_head=1)}.items():
        config = modeling.ModelConfig(**{**dict(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16,
                                                 n_inner=32, max_seq_len=96, bos_id=None, eos_id=tok.eos_id), **cfg})
        hf.save_pretrained(modeling.Transformer(config), str(tmp / family), tok)
    rows = [{"instruction": f"say {w}", "context": "" if i % 2 else f"word {i}", "response": w * 2, "category": "x"}
            for i, w in enumerate(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"] * 2)]
    (tmp / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "wiki.jsonl").write_text("".join(json.dumps({"text": f"document {i} " + "lorem ipsum " * (3 + i % 5)}) + "\n"
                                            for i in range(24)))
    train_set = data.load_task(f"dolly:{tmp / 'dolly.jsonl'}", "train", tok, 64)
    write_rejected(tmp / "rejected.jsonl", [{"id": e.id, "rejected": "no"} for e in train_set])
    for family in ("gpt2", "llama"):
        negatives.main(["--model", str(tmp / family), "--data", f"dolly:{tmp / 'dolly.jsonl'}", "--spec", "an:11",
                        "--out", str(tmp / f"an_{family}"), "--max-new-tokens", "6", "--max-len", "64", "--device", "cpu"])
    return tmp


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_one_step_with_a_stand_in(name, stand_ins, tmp_path):
    cfg = preset(name)
    family = "gpt2" if "gpt2" in name else "llama"
    task = f"dolly:{stand_ins / 'dolly.jsonl'}" if cfg.task == "dolly" else f"wiki:{stand_ins / 'wiki.jsonl'}"
    cfg = replace(cfg, init_from=str(stand_ins / family), task=task, max_len=64, steps=1, batch_size=8, micro_batch_size=8,
                  n_val=4, log_interval=1, eval_interval=0, ckpt_interval=0, device="cpu", out_dir=str(tmp_path),
                  an_cache=str(stand_ins / f"an_{family}") if cfg.an_cache else "",
                  dpo_rejected=str(stand_ins / "rejected.jsonl") if cfg.dpo_rejected else "")
    final = train.train(cfg)
    assert os.path.isdir(final)
