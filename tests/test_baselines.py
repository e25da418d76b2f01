"""The DPO and PSS baselines (the paper's presets: tests/test_presets.py)."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import train
from test_train import hand_logp


def tiny_setup(cfg):
    """The tiny run's policy, tokenizer, 4 synthetic examples and runtime, after its config."""
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


def test_dpo_step_gradient_matches_bradley_terry(tmp_path, tiny_config, perturb):
    cfg, policy, tok, examples, rt = tiny_setup(tiny_config(objective="dpo", beta=0.5))
    ref = train.frozen_copy(policy)
    perturb(policy)
    rows = [{"id": e.id, "rejected": e.response[::-1] + "x"} for e in examples]
    path = write_rejected(tmp_path / "rejected.jsonl", rows)
    rt.rejected = data.load_rejected(path, examples, tok, cfg.max_len)
    loss_sum, _ = train.dpo_objective(cfg, policy, ref, examples, rt)
    (loss_sum / len(examples)).backward()
    ours = grads(policy)

    total = 0
    for e in examples:  # -log sigmoid(beta * ((pc - rc) - (pr - rr))), one example at a time
        chosen, rejected = data.collate([e], tok.pad_id), data.collate([rt.rejected[e.id]], tok.pad_id)
        pc = hand_logp(policy, chosen[0][0], chosen[1][0])
        pr = hand_logp(policy, rejected[0][0], rejected[1][0])
        rc = hand_logp(ref, chosen[0][0], chosen[1][0]).detach()
        rr = hand_logp(ref, rejected[0][0], rejected[1][0]).detach()
        total = total - F.logsigmoid(cfg.beta * ((pc - rc) - (pr - rr)))
    (total / len(examples)).backward()
    assert_grads_close(ours, grads(policy))


def test_rejected_file_errors_name_file_and_line(tmp_path, tiny_config):
    cfg, policy, tok, examples, rt = tiny_setup(tiny_config(objective="dpo"))
    rows = [{"id": examples[0].id, "rejected": "x"}, {"id": examples[1].id}]
    bad = write_rejected(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'rejected'"):
        data.load_rejected(bad, examples, tok, cfg.max_len)
    (tmp_path / "torn.jsonl").write_text('{"id": "a", "rejected": "x"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"torn\.jsonl:2: bad JSON"):
        data.load_rejected(str(tmp_path / "torn.jsonl"), examples, tok, cfg.max_len)
    rows = [{"id": e.id, "rejected": "x"} for e in examples[:-1]]
    missing = write_rejected(tmp_path / "missing.jsonl", rows)
    refused = rf"missing\.jsonl: no rejected response for example '{examples[-1].id}'"
    with pytest.raises(ValueError, match=refused):
        data.load_rejected(missing, examples, tok, cfg.max_len)

# ----------------------------------------------------------------------------- PSS

def test_pss_with_p0_is_exactly_an_mle_step(tiny_config):
    cfg, policy, tok, examples, rt = tiny_setup(tiny_config(objective="pss", pss_p=0.0, pss_samples=3))
    tokens = sum(len(e.continuation_ids) for e in examples)
    pss_loss, _ = train.pss_objective(cfg, policy, None, examples, rt)
    (pss_loss / (cfg.pss_samples * tokens)).backward()
    pss = grads(policy)
    mle_loss, _ = train.mle_objective(cfg, policy, None, examples, rt)
    (mle_loss / tokens).backward()
    torch.testing.assert_close(pss_loss / cfg.pss_samples, mle_loss, atol=1e-5, rtol=1e-6)
    assert_grads_close(pss, grads(policy))


def test_pss_with_p1_feeds_samples_and_trains_on_the_truth(monkeypatch, tiny_config):
    """p = 1: every continuation input token is the first pass's sample (here forced to token 7), the
    prompt is untouched, and the loss is the ground truth's NLL given those mixed inputs, nothing else."""
    cfg, policy, tok, examples, rt = tiny_setup(tiny_config(objective="pss", pss_p=1.0, pss_samples=2))
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: torch.full((len(probs), n), 7))
    seen = []
    policy.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    loss, _ = train.pss_objective(cfg, policy, None, examples, rt)
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
