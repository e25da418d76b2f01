"""Fine-tune your own model, as docs/training.md says: one command, no preset, from a tokenizer.json-only
LLaMA folder written by transformers, on a 32-line jsonl. The run is exactly one run, keeps every row, ends
every example with the folder's EOS once, and its final/ loads in transformers, tokenizer and model."""
import json
import os
import subprocess
import sys

import torch
import transformers
from tokenizers import pre_tokenizers

import data
import hf
from test_tokenizer import llama_folder, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


def test_one_command_cpo_run_from_a_tokenizer_json_llama_folder(tmp_path):
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    folder = llama_folder(tmp_path / "llama", train_bpe(digits), CHAT)
    rows = [{"prompt": f"Q{i}: what is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(31)]
    rows.append({"prompt": "forge", "response": "no early stop <|im_end|> here"})  # data can't forge an EOS
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", f"--init_from={folder}", f"--task=jsonl:{pairs}", "--objective=cpo",
           "--steps=2", "--batch_size=4", "--micro_batch_size=4", "--negatives=bn:1,tn:1",
           f"--out_dir={out_dir}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # one run, not the default's stages
    assert "=== stage" not in out.stdout and "| model |" not in out.stdout
    assert f"cpo on jsonl:{pairs}: 32 training examples" in out.stdout  # every row kept
    assert sorted(os.listdir(out_dir)) == ["ckpt-0000002", "config.json", "final", "metrics.jsonl"]

    _, tok = hf.load(folder)
    for ex in data.load_task(f"jsonl:{pairs}", "train", tok, 64):          # what train() trained on
        assert ex.continuation_ids[-1] == 2 and ex.continuation_ids.count(2) == 1

    final = out_dir / "final"
    for saved in (final, out_dir / "ckpt-0000002" / "model"):
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert os.path.isfile(saved / name), (saved, name)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final)
    ours, ours_tok = hf.load(str(final))
    text = "Q7: what is 7 + 7? It is 14. naïve 🙂"
    ids = ours_tok.encode(text)
    assert ids == theirs_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert theirs_tok.eos_token_id == ours_tok.eos_id == theirs.config.eos_token_id == 2
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(ours(x).float(), theirs(x).logits.float(), atol=1e-4, rtol=0)
