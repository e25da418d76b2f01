# The method in miniature, run by `python miniature.py` (not by train.py: the AN and DPO stages need
# files that command writes per seed). On the built-in synthetic task, per seed: the reference (MLE from
# scratch), then from it, all for the same steps and batch: MLE continued, CPO with each negative type with
# and without ranking, DPO and PSS. `config` and `stages` are train.py settings, as in config/default.py;
# `experiment` holds the command's own settings, and `tiny` what --scale tiny overrides (the test's size).
#
# Sizes: 3 seeds took 17.0 minutes on 2 shared CPU cores (two runs at a time, one thread each): a reference
# ~4 min (600 steps, its AN cache and its scores), a CPO run 30-45 s, MLE 8 s, DPO/PSS 15-20 s, an ensemble
# 4 s.
# A CPO step with K = 12 costs ~15 MLE steps of the same batch, so the CPO runs use 4 negatives per example
# (K = 5), as the paper's negative-type ablation does.

config = dict(task="synthetic", init_from="scratch", n_layer=4, n_head=4, n_embd=128, max_len=48,
              n_val=64, device="cpu", log_interval=25, eval_interval=0, ckpt_interval=0, keep_last=1)

# 50 steps x 16: each of the 800 examples once
_continued = dict(init_from="ref", steps=50, batch_size=16, micro_batch_size=16, lr=2e-4, n_train=800)
_cpo = dict(_continued, objective="cpo")

stages = dict(
    ref=dict(objective="mle", steps=600, batch_size=64, micro_batch_size=64,  # as default.py's
             lr=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.1, n_train=20000,
             ckpt_interval=200),
    mle=dict(_continued, objective="mle"),
    cpo_an=dict(_cpo, negatives="an:4"),            # an_cache: filled in per seed by the command
    cpo_anr=dict(_cpo, negatives="an:4", ranked=True),
    cpo_bn=dict(_cpo, negatives="bn:4"),
    cpo_bnr=dict(_cpo, negatives="bn:4", ranked=True),
    cpo_mn=dict(_cpo, negatives="mn:4"),
    cpo_mnr=dict(_cpo, negatives="mn:4", ranked=True),
    cpo_tn=dict(_cpo, negatives="tn:4"),
    cpo_tnr=dict(_cpo, negatives="tn:4", ranked=True),
    cpo_mixn=dict(_cpo, negatives="bn:1,mn:2,tn:1"),  # the paper's 3:5:3 mix, scaled to 4
    cpo_mixnr=dict(_cpo, negatives="bn:1,mn:2,tn:1", ranked=True),
    dpo=dict(_continued, objective="dpo"),           # dpo_rejected: data.synthetic_rejected, written per seed
    pss=dict(_continued, objective="pss"),
)

experiment = dict(
    seeds="0,1,2",                         # one reference and 13 continued runs per seed
    n_eval=500,                            # held-out test prompts, greedy decoding, the same for every model
    alphas="0,0.1,0.3,0.5,0.7,0.9",        # weight of the MLE model in the ensemble with the best CPO variant
    jobs=2,                                # runs at a time, each with cores // jobs threads
)

# --scale tiny: a smoke test of the whole command (tests/test_miniature.py)
tiny = dict(config=dict(n_layer=1, n_head=2, n_embd=32, n_val=8, log_interval=1, ckpt_interval=0),
            ref=dict(steps=4, batch_size=8, micro_batch_size=8, n_train=64, warmup_steps=0),
            continued=dict(steps=2, batch_size=8, micro_batch_size=8, n_train=16),
            experiment=dict(seeds="0", n_eval=24, jobs=1))
