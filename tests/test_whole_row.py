"""The whole row of the paper (section "A whole row" of docs/paper_runs.md, the README's page on the paper's
runs), run as written:
SFT -> dpo-negatives -> AN negatives -> every run -> interpolate -> generate (each run, each alpha) ->
judge -> report, by bash, `for` loops and all, from a scratch folder holding links to the repo's scripts and
config/ (so its out/ lands in tmp_path).

What is swapped, and nothing else:
- the launcher, by textual substitution: `torchrun --standalone --nproc_per_node=8` becomes
  `python -m torch.distributed.run --standalone --nproc_per_node=2`, 2 ranks on the CPU (gloo), since there is
  no GPU here; torchrun itself (not plain python), so DDP and the presets' FSDP run as they would on a node;
- the judge URL, by textual substitution: https://api.openai.com/v1 becomes a local OpenAI-compatible server
  on 127.0.0.1 (test_judge_query.RecordingJudge: "A" or "B" to a judge prompt, a short text to a DPO prompt),
  since tests never touch the network;
- the model, data and sizes, by wrapping commands: a bash function `python` runs the real python with the
  README command's own arguments and then a few more, which win (argparse keeps the last value of a flag):
  train.py gets a tiny Dolly-format file (--task), tiny sizes (2 steps, batch 4, max_len 64, 4 held-out
  examples) and, for the SFT preset only, a tiny random GPT-2 (1 layer, width 16, byte tokenizer, written by
  hf.save_pretrained) instead of gpt2-xl; negatives.py and evaluate.py's generate and dpo-negatives get the
  same Dolly file; negatives.py samples 6 tokens, generate 8 tokens for 4 test prompts instead of 1000.
  Everything else (objectives, negatives, ranking, lr, beta, fsdp, the alphas, file names) is the README's.
Every command must succeed (bash -e). Any other network access fails at once: the proxies and the hub point
at a closed port on 127.0.0.1. The whole output is kept in tmp_path/row.log. About 2.5 minutes on 2 busy
cores."""
import json
import os
import re
import subprocess
import sys

import torch

import evaluate
import hf
import model as modeling
from test_judge_query import RecordingJudge
from tokenizer import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["mle", "pss", "dpo", "anr", "mixnr"]
ALPHAS = ["0", "0.1", "0.3", "0.5", "0.7", "0.9"]

TORCHRUN = ("torchrun --standalone --nproc_per_node=8",
            "python -m torch.distributed.run --standalone --nproc_per_node=2")
JUDGE_URL = "https://api.openai.com/v1"

WRAPPER = r"""set -euo pipefail
TRAIN_SIZES="--task=dolly:$DOLLY --steps=2 --batch_size=4 --micro_batch_size=2 --max_len=64 --n_val=4"
# the stand-ins' flags for the command whose arguments are "$@" (its script, then its first argument)
tiny() {
    local arg script="" first=""
    for arg in "$@"; do
        if [ -n "$script" ]; then first=$arg; break; fi
        case $arg in *.py) script=$arg;; esac
    done
    case "$script $first" in
        "train.py config/dolly_gpt2xl_sft.py") echo "$TRAIN_SIZES --init_from=$TINY_MODEL";;
        "train.py "*) echo "$TRAIN_SIZES";;
        "negatives.py "*) echo "--data dolly:$DOLLY --max-new-tokens 6";;
        "evaluate.py generate") echo "--task dolly:$DOLLY --n 4 --max-new-tokens 8";;
        "evaluate.py dpo-negatives") echo "--task dolly:$DOLLY";;
    esac
}
python() { echo "+ python $* $(tiny "$@")" >&2; command python "$@" $(tiny "$@"); }
"""


def readme_row():
    """The bash block of section "A whole row" in docs/paper_runs.md (the page on the paper's runs)."""
    page = open(os.path.join(ROOT, "docs", "paper_runs.md")).read()
    section = page.split("\n## A whole row\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


def swapped(block, judge_url):
    for old, new in [TORCHRUN, (JUDGE_URL, judge_url)]:
        assert block.count(old) == 1, f"docs/paper_runs.md's whole row: expected {old!r} once"
        block = block.replace(old, new)
    return block


def stand_ins(folder):
    """A tiny random GPT-2 (byte tokenizer) and a Dolly-format file of 32 rows (about half train, half test),
    every answer distinct (BN needs 3 others in a batch of 4), some rows with context."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = modeling.ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                  n_kv_head=2, n_embd=16, n_inner=32, max_seq_len=96, bos_id=None,
                                  eos_id=tok.eos_id)
    hf.save_pretrained(modeling.Transformer(config), str(folder / "tiny_gpt2"), tok)
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon"]
    rows = [{"instruction": f"Name thing {i}.",
             "context": f"It is like a {words[i % 8]}." if i % 3 == 0 else "",
             "response": f"{words[i % 8]} {i}", "category": "open_qa"} for i in range(32)]
    (folder / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "tiny_gpt2"), str(folder / "dolly.jsonl")


def test_readmes_whole_row_runs_as_written(tmp_path):
    work = tmp_path / "row"
    work.mkdir()
    # the repo's scripts and presets, linked: out/ is written here, not in the repo
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "config":
            os.symlink(os.path.join(ROOT, name), work / name)
    tiny_model, dolly = stand_ins(tmp_path)
    closed = "http://127.0.0.1:9"  # nothing listens there: any download fails at once
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "HF_TOKEN")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TINY_MODEL=tiny_model, DOLLY=dolly,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               NANOCPO_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=closed,
               HTTP_PROXY=closed, HTTPS_PROXY=closed, http_proxy=closed, https_proxy=closed,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    judge = RecordingJudge()
    try:
        script = WRAPPER + swapped(readme_row(), judge.url)
        (tmp_path / "row.sh").write_text(script)
        out = subprocess.run(["bash", str(tmp_path / "row.sh")], cwd=work, env=env, capture_output=True,
                             text=True, timeout=900)
    finally:
        judge.close()
    (tmp_path / "row.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]

    # every run trained from the SFT model, in the preset's own out_dir
    for run in RUNS:
        config = json.load(open(work / "out" / f"dolly_gpt2xl_{run}" / "config.json"))
        assert config["init_from"] == "out/dolly_gpt2xl_sft/final" and config["steps"] == 2
    # the report: one row per run and one per alpha of the MixNR ensemble, each with a win rate over 4 pairs
    report = (work / "out" / "dolly_gpt2xl_eval" / "report.md").read_text()
    rows = {}
    for line in report.splitlines()[2:]:
        method, alpha, decoding, win, n, _ = [c.strip() for c in line.strip("|").split("|")]
        rows[(method, alpha)] = (decoding, win, n)
    expected = {(f"dolly_gpt2xl_{run}", "-") for run in RUNS} | {("dolly_gpt2xl_mixnr", a) for a in ALPHAS}
    assert set(rows) == expected, report
    for decoding, win, n in rows.values():
        win_with_ci = re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", win)
        assert decoding == "greedy" and n == "4" and win_with_ci, report
    assert (work / "out" / "dolly_gpt2xl_eval" / "win_rate_vs_alpha.svg").is_file()
    # the judge was asked about the plain instructions, and wrote the DPO run's rejected answers
    asked = judge.contents()
    assert any(c.startswith("Given the ground truth instruction") for c in asked)
    assert any("Query: Name thing" in c for c in asked)
    assert all("### Response:" not in c and "### Instruction:" not in c for c in asked)
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


def test_the_rows_generate_runs_on_the_nodes_gpu_without_a_flag(monkeypatch):
    """The row's generate commands name no device: generate takes the GPU when there is one, else the CPU."""
    devices = []
    monkeypatch.setattr(evaluate, "generate", lambda args: devices.append(args.device))
    argv = ["generate", "--model", "m", "--task", "dolly", "--out", "gens.jsonl"]
    for gpu in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        evaluate.main(argv)
    assert devices == ["cuda:0", "cpu"]  # model.resolve_device: this process's GPU (LOCAL_RANK, else 0)
