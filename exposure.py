"""
Exposure bias, measured by position in the answer (docs/exposure_bias.md, "The measure"; pre-registered).

For each position i = 0, 1, ... of a true answer (its final EOS included), over the answers long enough to
have it: TF(i), teacher forcing, the share whose i-th token is the model's argmax given the prompt and the
*true* first i tokens; FR(i), free running, the share whose i-th token the model's *greedy* answer gets
right, having been fed its own first i tokens (after its own EOS every position is wrong, as
data.score_synthetic's token_accuracy counts). The gap G(i) = TF(i) - FR(i): 0 at i = 0, where both see
the prompt alone, and 0 everywhere for a model whose greedy answers are all right; growing with i, it is
exposure bias. The overall numbers pool every (answer, position) pair (so the overall FR is a token
accuracy weighted by answer length, unlike token_accuracy's mean over answers).

    gens = decoding.greedy_continuations(net, tok, examples, n_new)   # the model's greedy answers
    measure = exposure.exposure_bias(net, tok, examples, gens)        # JSON: positions, buckets, overall
"""
import torch

import data
from common import cut_at_eos

# position buckets of the results table: name -> [first, last + 1) positions (None: to the end)
BUCKETS = {"0": (0, 1), "1-4": (1, 5), "5-9": (5, 10), "10-19": (10, 20), "20-39": (20, 40),
           "40+": (40, None)}


@torch.no_grad()
def teacher_forced_predictions(net, examples, pad_id, batch_size=32):
    """Per example, the model's argmax for each answer token given the prompt and the true tokens before it
    -> lists as long as each continuation_ids. Only the positions that predict an answer token go through
    the output layer: (answer tokens, V) logits per batch, never (B, T, V)."""
    preds = []
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        ids, cont_mask = data.collate(batch, pad_id)                      # (B, T) each, right-padded
        device = net.tok_emb.weight.device
        hidden = net(ids.to(device), return_hidden=True)                  # (B, T, C); causal: padding unseen
        predicts_answer = cont_mask[:, 1:].to(device)                     # (B, T-1): position t predicts t+1
        guess = net.lm_head(hidden[:, :-1][predicts_answer]).argmax(-1)   # (answer tokens in the batch,)
        lengths = [len(e.continuation_ids) for e in batch]
        preds += [g.tolist() for g in guess.cpu().split(lengths)]        # row-major: each answer in order
    return preds


def position_hits(teacher_forced, greedy, truths, eos_id):
    """Pure counting. teacher_forced: per answer, the TF argmax at each position; greedy: per answer, the
    greedy new ids as generated (EOS and padding after it included); truths: continuation_ids.
    -> (count, tf, fr): per position i, the answers that have it, and the TF and FR hits among them."""
    longest = max(len(t) for t in truths)
    count, tf, fr = [0] * longest, [0] * longest, [0] * longest
    for predicted, generated, truth in zip(teacher_forced, greedy, truths):
        generated = cut_at_eos(generated, eos_id)  # after the model's own EOS: nothing, so wrong
        for i, token in enumerate(truth):
            count[i] += 1
            tf[i] += int(predicted[i] == token)
            fr[i] += int(i < len(generated) and generated[i] == token)
    return count, tf, fr


def pooled(count, tf, fr, first=0, end=None):
    """TF, FR and their gap pooled over positions [first, end) -> a dict, or None where no answer reaches."""
    n = sum(count[first:end])
    if n == 0:
        return None
    t, f = sum(tf[first:end]) / n, sum(fr[first:end]) / n
    return {"tf": t, "fr": f, "gap": t - f, "n": n}


def summarize(count, tf, fr):
    """position_hits' counts -> the JSON-able measure: per position (accuracies and counts), per bucket,
    and overall (every (answer, position) pair)."""
    return {
        "positions": {"n": count, "tf_hits": tf, "fr_hits": fr,
                      "tf": [t / n for t, n in zip(tf, count)], "fr": [f / n for f, n in zip(fr, count)],
                      "gap": [(t - f) / n for t, f, n in zip(tf, fr, count)]},
        "buckets": {name: pooled(count, tf, fr, first, end) for name, (first, end) in BUCKETS.items()},
        "overall": pooled(count, tf, fr),
    }


def exposure_bias(net, tok, examples, greedy, batch_size=32):
    """The measure for one model on held-out examples, given its greedy answers to them (generated once by
    the caller, who scores them too) -> summarize's dict."""
    truths = [e.continuation_ids for e in examples]
    teacher_forced = teacher_forced_predictions(net, examples, tok.pad_id, batch_size)
    return summarize(*position_hits(teacher_forced, greedy, truths, tok.eos_id))
