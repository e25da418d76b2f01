# "When does CPO help?" (docs/study.md), part 1: the built-in synthetic task. Run by
#     python miniature.py --config experiments/study.py --out out/study
# Every setting tried, on seeds 0-2, scored on the *val* split (test words, a stream of their own), never on
# the test prompts. The reference is the miniature's (experiments/miniature.py), so its runs can be shared.
# Each continued row names its hypothesis; `baselines` pairs it with MLE continued at the same steps, batch
# and lr. Chosen setting: the largest mean val exact-match gain over its baseline
# (experiments/study_final.py).
import os
import runpy

_mini = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "miniature.py"))
config = _mini["config"]
_continued = _mini["_continued"]                        # 50 steps x 16 examples, lr 2e-4: the miniature's
_longer = dict(_continued, steps=200, lr=1e-3)          # H1: 4x the steps (each example 4 times), 5x the lr
_an = dict(objective="cpo", negatives="an:4")
_gentle = dict(_continued, steps=200, lr=5e-5)          # round 2: 4x the steps at a quarter of the lr

stages = dict(
    ref=_mini["stages"]["ref"],
    mle=dict(_continued, objective="mle"),
    cpo_an=dict(_continued, **_an),                                       # the miniature's AN row
    cpo_an_beta0_5=dict(_continued, **_an, beta=0.5),                     # H1: a weaker pull to pi_ref
    mle_200=dict(_longer, objective="mle"),
    cpo_an_200=dict(_longer, **_an),                                      # H1: longer and stronger
    cpo_an_200_beta0_5=dict(_longer, **_an, beta=0.5),                    # H1
    cpo_an_200_alpha1=dict(_longer, **_an, mle_weight=1.0),               # H2: 1 * L_MLE + L_CPO
    cpo_an_t0_5_200=dict(_longer, **_an, an_cache="an_t0.5"),             # H3: AN at temperature 0.5
    # the paper's mix; MN from pi_theta
    cpo_mixn_200=dict(_longer, objective="cpo", negatives="bn:1,mn:2,tn:1"),
    # Round 2, written after round 1 (docs/study.md): lr 1e-3 wrecked every CPO run, so gentler and longer,
    # and an MLE term weighted to match the CPO term's scale (beta x answer length ~ 5 x 8 tokens:
    # alpha ~ 30)
    mle_200_lr5e_5=dict(_gentle, objective="mle"),
    cpo_an_200_lr5e_5=dict(_gentle, **_an),                               # R1: gentle and long
    cpo_an_200_lr5e_5_alpha30=dict(_gentle, **_an, mle_weight=30.0),      # R2: ... with a matched MLE term
    cpo_an_alpha30=dict(_continued, **_an, mle_weight=30.0),              # R2 at the miniature's budget
    # R3: the model's own samples, gently
    cpo_mixn=dict(_continued, objective="cpo", negatives="bn:1,mn:2,tn:1"),
)

tiny = _mini["tiny"]  # --scale tiny: the smoke test (tests/test_study.py)

# each row's MLE baseline: the MLE run of the same steps, batch and lr
_baselines = {}
for _name in stages:
    if "lr5e_5" in _name:
        _baselines[_name] = "mle_200_lr5e_5"
    elif "_200" in _name:
        _baselines[_name] = "mle_200"
    else:
        _baselines[_name] = "mle"

experiment = dict(
    seeds="0,1,2", n_eval=500, split="val", alphas="", jobs=2,
    an_temperatures={"an_t0.5": 0.5},                   # seed<S>/an_t0.5/: the H3 cache (seed<S>/an/: T = 1)
    baselines=_baselines,
)
