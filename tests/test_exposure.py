"""exposure.py, the exposure-bias measure of docs/exposure_bias.md: teacher-forced (TF) against free-running
(FR) token accuracy by answer position. The counting is checked by hand; the two properties the
pre-registration states are checked on real tiny models with real greedy decoding: G(0) = 0, and G = 0
everywhere for a model whose greedy answers are all right."""
import dataclasses

import pytest
import torch

import data
import decoding
import exposure
import model
import tokenizer

EOS = 256  # the byte tokenizer's EOS, and its padding


def tiny_model(model_type="gpt2", n_layer=1, n_embd=32, seed=0):
    torch.manual_seed(seed)
    config = model.ModelConfig(model_type=model_type, vocab_size=257, n_layer=n_layer, n_head=2, n_kv_head=2,
                               n_embd=n_embd, n_inner=4 * n_embd, max_seq_len=64, bos_id=None, eos_id=EOS)
    return model.Transformer(config).eval()


# ----------------------------------------------------------------------------- the counting, by hand
def test_free_running_counts_every_position_after_an_early_eos_as_wrong():
    truth = [1, 2, 3, 4, EOS]
    greedy = [[1, EOS, 3, 4, EOS, EOS]]  # stops after one letter: its 3, 4 and EOS come after its own EOS
    count, tf, fr = exposure.position_hits([truth], greedy, [truth], EOS)
    assert (count, tf, fr) == ([1] * 5, [1] * 5, [1, 0, 0, 0, 0])


def test_free_running_hits_match_token_accuracy():
    truths = [[1, 2, 3, EOS], [5, 6, 7, EOS], [1, 1, 1, EOS]]
    greedy = [[1, 2, 3, EOS, EOS, EOS], [5, 9, 7, 8, 8, 8], [1, 1, EOS, 1, EOS, EOS]]  # right; no stop; early
    count, tf, fr = exposure.position_hits(truths, greedy, truths, EOS)
    assert fr == [3, 2, 2, 1] and tf == count == [3] * 4
    overall = exposure.summarize(count, tf, fr)["overall"]
    # answers of equal length: the pooled FR accuracy is exactly data.score_synthetic's token_accuracy
    assert overall["fr"] == pytest.approx(data.score_synthetic(greedy, truths, EOS)["token_accuracy"])
    assert overall == pytest.approx({"tf": 1.0, "fr": 8 / 12, "gap": 4 / 12, "n": 12})


def test_positions_count_only_the_answers_long_enough_to_have_them():
    truths = [[1, EOS], [1, 2, 3, EOS]]
    teacher_forced = [[1, 7], [1, 2, 3, EOS]]
    count, tf, fr = exposure.position_hits(teacher_forced, [[1, EOS], [1, 2, 3, EOS]], truths, EOS)
    assert count == [2, 2, 1, 1] and tf == [2, 1, 1, 1] and fr == [2, 2, 1, 1]
    measure = exposure.summarize(count, tf, fr)
    assert measure["positions"]["gap"] == [0, -0.5, 0, 0]  # TF can be the worse: its 7 where FR stopped right


def test_buckets_pool_their_positions_and_skip_the_ones_no_answer_reaches():
    count = [2] * 45
    tf = [2] * 45
    fr = [2] + [1] * 4 + [0] * 40  # FR: all right at 0, half right in 1-4, nothing after
    buckets = exposure.summarize(count, tf, fr)["buckets"]
    assert list(buckets) == ["0", "1-4", "5-9", "10-19", "20-39", "40+"]
    assert buckets["0"] == {"tf": 1.0, "fr": 1.0, "gap": 0.0, "n": 2}
    assert buckets["1-4"] == {"tf": 1.0, "fr": 0.5, "gap": 0.5, "n": 8}
    assert buckets["20-39"]["n"] == 40 and buckets["40+"] == {"tf": 1.0, "fr": 0.0, "gap": 1.0, "n": 10}
    short = exposure.summarize([2] * 12, [2] * 12, [2] * 12)["buckets"]
    assert short["10-19"]["n"] == 4 and short["20-39"] is None and short["40+"] is None
    overall = exposure.summarize(count, tf, fr)["overall"]
    assert overall["gap"] == pytest.approx((90 - 6) / 90)  # every (answer, position) pair, pooled


# ----------------------------------------------------------------------------- on real models
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_at_the_first_answer_token_both_accuracies_are_equal(model_type):
    net, tok = tiny_model(model_type, n_layer=2), tokenizer.byte_tokenizer()
    examples = data.load_task("synthetic", "test", tok, 40, n=24)  # prompts of different lengths: padding
    gens = decoding.greedy_continuations(net, tok, examples, 21, batch_size=8)
    # the argmax given the prompt alone is the greedy answer's first token, for every prompt
    teacher_forced = exposure.teacher_forced_predictions(net, examples, tok.pad_id, batch_size=5)
    assert [p[0] for p in teacher_forced] == [g[0] for g in gens]
    assert [len(p) for p in teacher_forced] == [len(e.continuation_ids) for e in examples]
    # the batched path against one plain forward each
    for e, predicted in list(zip(examples, teacher_forced))[:6]:
        ids = torch.tensor([e.prompt_ids + e.continuation_ids])                           # (1, T)
        with torch.no_grad():
            argmax = net(ids)[0, len(e.prompt_ids) - 1:-1].argmax(-1)                     # (answer length,)
        assert predicted == argmax.tolist()
    # a random model's answers are all wrong; let half of them start as the model's own first token does
    examples = [dataclasses.replace(e, continuation_ids=[g[0]] + e.continuation_ids[1:]) if i % 2 else e
                for i, (e, g) in enumerate(zip(examples, gens))]
    measure = exposure.exposure_bias(net, tok, examples, gens)
    first = measure["buckets"]["0"]
    assert first["tf"] == first["fr"] >= 0.5 and first["gap"] == 0 and measure["positions"]["gap"][0] == 0


def memorising_model(examples, tok, steps=300):
    """A 1-layer model trained on `examples` alone (plain MLE on the answer tokens) until its greedy answers
    to them are all right, or `steps` run out -> (model, its greedy answers)."""
    net = tiny_model(n_embd=64).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ids, cont_mask = data.collate(examples, tok.pad_id)                                 # (N, T) each
    for step in range(steps):
        logits = net(ids)                                                                # (N, T, V)
        predicts_answer = cont_mask[:, 1:]                                               # (N, T-1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][predicts_answer], ids[:, 1:][predicts_answer])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:
            gens = decoding.greedy_continuations(net.eval(), tok, examples, 21)
            truths = [e.continuation_ids for e in examples]
            if data.score_synthetic(gens, truths, tok.eos_id)["exact_match"] == 1:
                return net, gens
            net.train()
    return net.eval(), decoding.greedy_continuations(net, tok, examples, 21)


def test_a_model_whose_greedy_answers_are_all_right_has_no_gap_anywhere():
    tok = tokenizer.byte_tokenizer()
    examples = data.load_task("synthetic", "train", tok, 40, n=6)
    net, gens = memorising_model(examples, tok)
    truths = [e.continuation_ids for e in examples]
    assert data.score_synthetic(gens, truths, tok.eos_id)["exact_match"] == 1  # the premise, first
    measure = exposure.exposure_bias(net, tok, examples, gens)
    positions = measure["positions"]
    assert len(positions["n"]) == max(len(t) for t in truths) and positions["n"][0] == len(examples)
    assert positions["gap"] == [0] * len(positions["n"]) and positions["tf"] == [1] * len(positions["n"])
    assert measure["overall"] == {"tf": 1.0, "fr": 1.0, "gap": 0.0, "n": sum(map(len, truths))}
