"""The README's reading order for one CPO step ("Read these first") is the order the code calls."""
import os
import sys

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_reading_order_is_the_order_the_code_calls(tmp_path, tiny_config):
    """The README's "Read these first" table lists one CPO step in the order the code calls it: trace one
    step of a tiny run and check the listed functions are first entered in the README's order, and that
    after train.cpo_objective the step never goes back to a file it has left."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = [line for line in readme.split("## Read these first")[1].split("\n## ")[0].splitlines()
            if line.startswith("| ") and "`" in line.split("|")[2]]
    listed = [row.split("|")[2].strip().strip("`").removeprefix("back in ").strip("`") for row in rows]
    assert listed[0] == "train.train" and listed[-1] == "train.train"
    steps = listed[:-1]  # (module, qualified name) of each
    wanted = {tuple(name.split(".", 1)) for name in steps}
    first = []

    def profile(frame, event, arg):
        if event == "call":
            module = os.path.basename(frame.f_code.co_filename)[:-3]
            key = (module, frame.f_code.co_qualname)
            if key in wanted and key not in first:
                first.append(key)

    cfg = tiny_config(objective="cpo", negatives="bn:1,mn:1,tn:1", ranked=True, steps=1, batch_size=4,
                      micro_batch_size=4, n_train=8, ckpt_interval=0, out_dir=str(tmp_path / "run"))
    sys.setprofile(profile)
    try:
        train.train(cfg)
    finally:
        sys.setprofile(None)
    assert first == [tuple(name.split(".", 1)) for name in steps], first
    after = [module for module, _ in first[first.index(("train", "cpo_objective")):]]
    assert all(after.index(m) == i or after[i - 1] == m for i, m in enumerate(after)), after
