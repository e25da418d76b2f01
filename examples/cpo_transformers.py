"""
CPO (Feng et al. 2024) for a transformers AutoModelForCausalLM, in a plain PyTorch loop, with nothing of
nanoCPO but cpo.py: truncation (TN) and batch (BN) negatives, a frozen copy as pi_ref, AdamW.

    python examples/cpo_transformers.py                # a tiny random GPT-2 over bytes: offline, seconds
    python examples/cpo_transformers.py --model gpt2 --steps 20 --lr 1e-5 --alpha 0.1

Copy cpo.py next to this file and it runs anywhere torch and transformers do.
"""
import argparse
import copy
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's; a copy here wins
import cpo  # noqa: E402

PAIRS = [("The capital of France is", " Paris."), ("Two plus two is", " four."),
         ("The opposite of hot is", " cold."), ("Water freezes at zero degrees", " Celsius.")]


def load(name=None):
    """-> (model, encode(text, prompt) -> ids, eos_id). No name: a tiny random GPT-2 over bytes, EOS = 256."""
    if name:
        tok = AutoTokenizer.from_pretrained(name)
        encode = lambda text, prompt: tok(text, add_special_tokens=prompt).input_ids  # noqa: E731
        return AutoModelForCausalLM.from_pretrained(name), encode, tok.eos_token_id
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(config), lambda text, prompt: list(text.encode()), 256


def make_batch(pairs, encode, eos_id, n_tn=2, n_bn=2, generator=None):
    """-> ids (B, K, T), prompt + continuation right-padded with EOS; cont_mask (B, K, T) True on each
    continuation, its EOS included; valid (B, K). Column 0 the ground truth, then TN, then BN negatives."""
    prompts = [encode(p, True) for p, _ in pairs]
    truths = [encode(a, False) + [eos_id] for _, a in pairs]
    rows = []
    for gt, bn in zip(truths, cpo.batch_negatives(truths, n_bn, generator)):
        tn = cpo.truncation_negatives(gt, n_tn, eos_id, generator)
        rows.append([gt] + tn + [gt] * (n_tn - len(tn)) + bn)  # no TN of a bare EOS: a copy, invalid
    valid = torch.tensor([[k == 0 or c != row[0] for k, c in enumerate(row)] for row in rows])  # (B, K)
    seqs = [(p, c) for p, row in zip(prompts, rows) for c in row]
    T = max(len(p) + len(c) for p, c in seqs)
    ids, cont_mask = torch.full((len(seqs), T), eos_id), torch.zeros(len(seqs), T, dtype=torch.bool)
    for n, (p, c) in enumerate(seqs):
        ids[n, :len(p) + len(c)] = torch.tensor(p + c)
        cont_mask[n, len(p):len(p) + len(c)] = True
    return ids.view(*valid.shape, T), cont_mask.view(*valid.shape, T), valid


def sequence_logps(model, ids, cont_mask):
    """log pi(y|x) of (B, K, T) sequences -> (B, K), from the final hidden states: no (N, T, V) logits."""
    ids, mask = ids.flatten(0, 1), cont_mask.flatten(0, 1)  # (N, T), N = B*K
    out = model(ids[:, :-1], output_hidden_states=True, logits_to_keep=1)  # right-padded: no attention mask
    hidden = out.hidden_states[-1]  # (N, T-1, C), after the final norm
    logps = cpo.sequence_logprobs_from_hidden(hidden, model.lm_head.weight, ids[:, 1:], mask[:, 1:])  # (N,)
    return logps.view(cont_mask.shape[:2])


def cpo_step_loss(policy, ref, ids, cont_mask, valid, beta=5.0, ranked=False, alpha=0.0):
    """-> (eq. (1) (eq. (2) if ranked) averaged over the batch + alpha * L_MLE, the reward metrics)."""
    policy_logps = sequence_logps(policy, ids, cont_mask)  # (B, K)
    with torch.no_grad():
        ref_logps = sequence_logps(ref, ids, cont_mask)
    losses, rewards = cpo.cpo_loss(policy_logps, ref_logps, beta, ranked, valid)  # (B,), (B, K)
    mle = -policy_logps[:, 0].sum() / cont_mask[:, 0].sum()  # L_MLE: the ground truths' mean token NLL
    return losses.mean() + alpha * mle, cpo.reward_metrics(rewards, valid)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or hub name (default: a tiny random GPT-2)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.0, help="weight of L_MLE in alpha * L_MLE + L_CPO")
    args = p.parse_args()
    torch.manual_seed(0)
    policy, encode, eos_id = load(args.model)
    policy.eval()  # no dropout, as DPO trainers do: pi_theta and pi_ref score alike at the start
    ref = copy.deepcopy(policy).requires_grad_(False)  # pi_ref: the starting point, frozen
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        batch = make_batch(PAIRS, encode, eos_id, generator=g)  # fresh TN cuts and BN picks every step
        loss, metrics = cpo_step_loss(policy, ref, *batch, alpha=args.alpha)  # beta = 5, eq. (1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}, reward accuracy {metrics['reward_accuracy']:.2f}, "
              f"margin {metrics['reward_margin']:.3f}")


if __name__ == "__main__":
    main()
