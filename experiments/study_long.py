# "When does CPO help?" (docs/study.md), part 2, H4: the synthetic task with long answers (synthetic:long:
# words of 20-40 letters, answers of ~16-80 letters, where one wrong or missing letter shifts all that
# follows).
#     python miniature.py --config experiments/study_long.py --out out/study_long
# Seeds 0-2, the val split, as experiments/study.py. The reference is the same 0.8M-parameter GPT-2 trained
# from scratch; its sequences are 2.7x longer, so it takes 500 steps of 32 (a CPU budget: ~5 min).
import os
import runpy

_study = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py"))
config = dict(_study["config"], task="synthetic:long", max_len=128)

stages = dict(
    ref=dict(_study["stages"]["ref"], steps=500, batch_size=32, micro_batch_size=32),
    # round 1's 200-step, lr 1e-3 rows (mle_200, cpo_an_200, cpo_an_200_alpha1, cpo_an_t0_5_200) were
    # dropped before they ran: on the short task that setting wrecked every CPO run (docs/study.md), and the
    # long task's runs cost ~3x as much. In their place, round 2's alpha-30 row at the miniature's budget.
    **{name: _study["stages"][name] for name in ("mle", "cpo_an", "cpo_an_alpha30")},
)

tiny = _study["tiny"]
experiment = dict(_study["experiment"], baselines={name: "mle" for name in stages}, an_temperatures={})
