"""Whole runs for tests/test_whole_runs.py: several epochs of every negative kind and DPO, in one process or
one torchrun launch (one process group for all of them, as the startup dominates a tiny run):
    python tests/whole_run_driver.py START OUT MODE name [name ...] [--flag=value ...]
    torchrun --standalone --nproc_per_node=2 tests/whole_run_driver.py START OUT MODE name [name ...]
START holds the shared inputs (tests/test_whole_runs.py writes them): the starting model
start/final (= pi_ref), its AN cache an/ and DPO's rejected answers rejected.jsonl. MODE is one of
MODES: how a preset distributes."""
import os
import signal
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

# 8 examples in global batches of 4: an epoch is 2 steps, so 6 steps are 3 epochs (the epoch boundaries are
# where the reference cache starts to hit). Checkpoints every 2 steps: the cache is saved and read back too.
# lr 1e-4: AdamW moves every weight by ~lr a step whatever its gradient's size, so float noise between two
# micro-batch splits (other padding) grows with lr; at 1e-4 the runs move the weights ~1e-3, far above 1e-5.
BASE = dict(init_from="", task="synthetic", max_len=40, n_train=8, n_val=4, batch_size=4, micro_batch_size=1,
            steps=6, lr=1e-4, log_interval=1, eval_interval=0, ckpt_interval=2, device="cpu", seed=0)
RUNS = {
    "an": dict(objective="cpo", negatives="an:2"),  # an_cache: START/an
    "bn": dict(objective="cpo", negatives="bn:2"),
    "mn": dict(objective="cpo", negatives="mn:2"),
    "tn": dict(objective="cpo", negatives="tn:2"),
    "mixnr": dict(objective="cpo", negatives="bn:1,mn:1,tn:1", ranked=True),
    "dpo": dict(objective="dpo"),  # dpo_rejected: START/rejected.jsonl
}
MODES = {"ddp": {}, "fsdp": dict(fsdp=True), "fsdp_ac": dict(fsdp=True, activation_checkpointing=True)}


def whole_run(start, out_dir, mode, name, **overrides):
    cfg = train.Config(**{**BASE, **RUNS[name], **MODES[mode], "out_dir": out_dir, **overrides})
    uses_an = "an:" in cfg.negatives and cfg.objective == "cpo"
    return replace(cfg, init_from=os.path.join(start, "start", "final"),
                   an_cache=os.path.join(start, "an") if uses_an else "",
                   dpo_rejected=os.path.join(start, "rejected.jsonl") if cfg.objective == "dpo" else "")


def die_after_checkpoint(step):
    """SIGKILL every process of the launch (torchrun and each rank, as when a node is lost) once the
    checkpoint of `step` is on disk: deterministic, where a kill sent on seeing the log line lands
    steps too late."""
    def wrap(save):
        def save_then_die(cfg, done, *args):
            path = save(cfg, done, *args)
            if done == step:
                if int(os.environ.get("RANK", 0)) == 0:
                    os.kill(os.getppid(), signal.SIGKILL)  # torchrun's agent: it must not restart the ranks
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        return save_then_die
    train.fsdp.save, train.save_checkpoint = wrap(train.fsdp.save), wrap(train.save_checkpoint)


if __name__ == "__main__":
    start, out, mode, *rest = sys.argv[1:]
    if any(a.startswith("--die_after_checkpoint=") for a in rest):
        die_after_checkpoint(int(next(a for a in rest if a.startswith("--die_after")).split("=")[1]))
        rest = [a for a in rest if not a.startswith("--die_after")]
    _, flags = train.parse_args([a for a in rest if a.startswith("--")])  # e.g. --ckpt_interval=1 --resume
    for name in [a for a in rest if not a.startswith("--")]:
        print(f"=== {mode} {name}", flush=True)
        train.train(whole_run(start, os.path.join(out, f"{mode}_{name}"), mode, name, **flags))
    train.close_distributed()  # as train.py's main ends: FSDP's modules freed before the process group
