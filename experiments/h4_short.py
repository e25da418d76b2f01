# Exposure bias and H4 (docs/exposure_bias.md), the default short task: the same comparison as
# experiments/h4_long.py where answers are short (the study's final table, plus the ensembles at 0.5 and 0.9).
# Pre-registered in git before any of its runs.
#     python miniature.py --config experiments/h4_short.py --out out/h4_short
import os
import runpy

_final = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study_final.py"))
config, stages, tiny = _final["config"], _final["stages"], _final["tiny"]
experiment = dict(_final["experiment"], alphas="0.5,0.9", an_temperatures={}, exposure=True)
