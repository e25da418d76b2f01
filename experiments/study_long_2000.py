# "When does CPO help?" (docs/study.md), after the study: H4 again, from a long-task reference that has
# learned the task. The study's long references (500 steps of 32) stop before the model learns to copy:
# their held-out loss is still ~1.9 nats a letter. One run of 2000 steps of 32 from scratch (~20
# CPU-minutes) passes that point: its training loss falls from 1.4 at step 1000 to 0.3 at step 1700. One
# seed only, so no win/tie/loss: a pointer for the next study, not a result of this one.
#     python miniature.py --config experiments/study_long_2000.py --out out/study_long_2000
import os
import runpy

_long = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study_long.py"))
config = _long["config"]
_study = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py"))
_chosen = ("mle_200_lr5e_5", "cpo_an_200_lr5e_5_alpha30")  # the study's chosen setting and its baseline
stages = dict(_long["stages"],
              ref=dict(_long["stages"]["ref"], steps=2000),
              **{n: _study["stages"][n] for n in _chosen})
tiny = _long["tiny"]
_baselines = {n: _study["experiment"]["baselines"][n] for n in stages}
experiment = dict(_long["experiment"], seeds="0", baselines=_baselines)
