# Exposure bias and H4 (docs/exposure_bias.md), the long task: does CPO help where answers are long enough
# for early mistakes to compound? Pre-registered in git before any of its runs.
#     python miniature.py --config experiments/h4_long.py --out out/h4_long
# The reference is study_long_2000's (2000 steps of 32 from scratch: it learns to copy, unlike the study's
# 500-step ones). From it, for 200 steps of 16 at lr 5e-5: MLE continued, and the study's chosen gentle CPO
# setting (AN:4, alpha 30); then the weight-space ensembles alpha * MLE + (1 - alpha) * CPO at 0.5 and 0.9.
# Fresh seeds 3-7, the untouched test split.
import os
import runpy

_here = os.path.dirname(os.path.abspath(__file__))
_long = runpy.run_path(os.path.join(_here, "study_long_2000.py"))
CHOSEN, BASELINE = "cpo_an_200_lr5e_5_alpha30", "mle_200_lr5e_5"

config = _long["config"]
stages = {name: _long["stages"][name] for name in ("ref", BASELINE, CHOSEN)}
tiny = _long["tiny"]
experiment = dict(_long["experiment"], seeds="3,4,5,6,7", split="test", alphas="0.5,0.9",
                  baselines={CHOSEN: BASELINE}, exposure=True)
