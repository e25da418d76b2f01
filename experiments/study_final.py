# "When does CPO help?" (docs/study.md), the final table: the setting chosen on seeds 0-2 and the val split
# by the rule written down before the runs (the largest mean val exact-match gain over its same-budget MLE
# baseline, where the reference's exact match is nonzero), run on fresh seeds 3-7 and scored on the
# untouched test split, next to that baseline. Nothing else is run: the reference, the baseline, the choice.
#     python miniature.py --config experiments/study_final.py --out out/study_final
import os
import runpy

_study = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py"))
CHOSEN = "cpo_an_200_lr5e_5_alpha30"  # val gain +0.0067 over mle_200_lr5e_5, the largest (docs/study.md)
BASELINE = _study["experiment"]["baselines"][CHOSEN]

config = _study["config"]
stages = {name: _study["stages"][name] for name in ("ref", BASELINE, CHOSEN)}
tiny = _study["tiny"]
experiment = dict(_study["experiment"], seeds="3,4,5,6,7", split="test", baselines={CHOSEN: BASELINE})
