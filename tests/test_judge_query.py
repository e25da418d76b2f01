"""The judge is asked about the question a person would put to a chatbot (issue #22): a Dolly example's
plain instruction and context, never the training prompt's "### Instruction: ... ### Response:" template.
Checked on the request bodies a local judge server on 127.0.0.1 receives (test_judge.py's server), for
evaluate.py's judge and dpo-negatives commands."""
import hashlib
import json

import pytest
import torch

import data
import evaluate
import hf
import model as modeling
from common import read_jsonl
from test_judge import ScriptedJudge
from tokenizer import byte_tokenizer

ROWS = [  # Dolly's format; one row with context, one without
    {"instruction": "Name a fruit that is yellow.", "context": "", "response": "A banana.",
     "category": "open_qa"},
    {"instruction": "Who met Bob?", "context": "Ann met Bob at noon.", "response": "Ann did.",
     "category": "closed_qa"},
]
QUERIES = ["Name a fruit that is yellow.", "Who met Bob?\n\nAnn met Bob at noon."]


class RecordingJudge(ScriptedJudge):
    """test_judge's server on 127.0.0.1, keeping every request body (the JSON the client POSTed). It answers
    a DPO prompt with an unhelpful text and a judge prompt with "A" or "B", by a hash of the prompt: the two
    orders of a pair are different prompts, so there are wins, losses and ties."""

    def __init__(self):
        self.bodies = []
        super().__init__()

    def handle(self, h, body):
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.bodies.append(body)
        if prompt.startswith("Given the ground truth instruction"):
            reply = "I would rather not say."
        else:
            reply = "AB"[hashlib.sha256(prompt.encode()).digest()[0] % 2]
        answer = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
        self.send(h, 200, json.dumps(answer).encode())

    def contents(self):
        return [b["messages"][-1]["content"] for b in self.bodies]


@pytest.fixture
def recording_judge():
    server = RecordingJudge()
    yield server
    server.close()


def client_flags(server, out):
    return ["--judge-url", server.url, "--judge-model", "judge-x", "--out", str(out), "--workers", "1"]


def test_judge_query_unformats_only_dolly_prompts():
    for row, plain in zip(ROWS, QUERIES):
        assert data.judge_query(data.dolly_prompt(row["instruction"], row["context"])) == plain
    others = ["rev hello=", "A wiki prefix", "### Instruction:\nx\n\n### Response:\nmore",
              "### Instruction:\n\n### Response:\n"]
    for other in others:
        assert data.judge_query(other) == other


def tiny_dolly(tmp_path):
    """A Dolly-format file of ROWS and a tiny random GPT-2 (byte tokenizer) to generate from."""
    (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = modeling.ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                  n_kv_head=2, n_embd=16, n_inner=32, max_seq_len=128, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id)
    hf.save_pretrained(modeling.Transformer(config), str(tmp_path / "model"), tok)
    return f"dolly:{tmp_path / 'dolly.jsonl'}", str(tmp_path / "model")


def test_judge_is_sent_the_plain_dolly_instruction(tmp_path, recording_judge):
    task, model = tiny_dolly(tmp_path)
    gens, judged = tmp_path / "gens.jsonl", tmp_path / "gens.judged.jsonl"
    evaluate.main(["generate", "--model", model, "--task", task, "--split", "all", "--n", "0",
                   "--out", str(gens), "--max-new-tokens", "4"])
    rows = {r["id"]: r for r in read_jsonl(gens)}
    # the file keeps the training prompt
    assert rows["dolly-1"]["prompt"].startswith("### Instruction:\nWho met Bob?")

    evaluate.main(["judge", "--generations", str(gens), "--task", "dolly",
                   *client_flags(recording_judge, judged)])
    contents = recording_judge.contents()
    assert len(contents) == 4  # two examples, both orders
    for i, plain in enumerate(QUERIES):
        asked = [c for c in contents if f"Query: {plain}\n Response A: " in c]
        assert len(asked) == 2, (plain, contents)
        assert {rows[f"dolly-{i}"]["reference"] in c for c in asked} == {True}
    for body in recording_judge.bodies:
        assert "### Response:" not in json.dumps(body) and "### Instruction:" not in json.dumps(body)


def test_dpo_negatives_are_asked_about_the_plain_dolly_instruction(tmp_path, recording_judge):
    task, model = tiny_dolly(tmp_path)
    out = tmp_path / "rejected.jsonl"
    evaluate.main(["dpo-negatives", "--task", task, "--split", "all", "--tokenizer", model,
                   "--max-len", "64", *client_flags(recording_judge, out)])
    assert read_jsonl(out) == [{"id": f"dolly-{i}", "rejected": "I would rather not say."} for i in range(2)]
    examples = tmp_path / "examples.jsonl"  # --examples of training prompts: the same plain requests
    lines = [{"id": f"ex{i}", "prompt": data.dolly_prompt(r["instruction"], r["context"]),
              "response": r["response"]} for i, r in enumerate(ROWS)]
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluate.main(["dpo-negatives", "--examples", str(examples),
                   *client_flags(recording_judge, tmp_path / "ex.jsonl")])
    contents = recording_judge.contents()
    assert len(contents) == 2  # the --examples run asked the same prompts: all from the cache
    for row, plain in zip(ROWS, QUERIES):
        assert sum(f" Instruction: {plain}\nResponse: {row['response']}\n" in c for c in contents) == 1
    for body in recording_judge.bodies:
        assert "### Response:" not in json.dumps(body) and "### Instruction:" not in json.dumps(body)
