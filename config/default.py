# The tiny CPU run, what `python train.py` does with no arguments: on the built-in synthetic task,
# train a small GPT-2 from scratch with MLE (the reference, pi_ref), then from it both CPO (MixNR: 3 BN +
# 5 MN + 3 TN negatives, ranked loss eq. 2) and MLE continued for the same steps, and compare the three
# on held-out prompts. The paper's presets have the same form: `config` alone, no `stages`.

config = dict(task="synthetic", init_from="scratch", n_layer=4, n_head=4, n_embd=128, max_len=48,
              n_train=20000, n_val=256, batch_size=64, micro_batch_size=64, device="cpu",
              out_dir="out/default", log_interval=25, eval_interval=0, ckpt_interval=100)

# The continued stages see 32 examples a step: a CPO step scores 12 sequences per example under the policy
# and the reference (about 15 MLE steps' work), and the whole default must stay within a few CPU minutes.
stages = dict(
    ref=dict(objective="mle", steps=600, lr=3e-3, warmup_steps=50, schedule="cosine", weight_decay=0.1),
    mle=dict(objective="mle", init_from="ref", steps=100, lr=1e-4, batch_size=32, micro_batch_size=32),
    cpo=dict(objective="cpo", init_from="ref", steps=100, lr=1e-4, batch_size=32, micro_batch_size=32,
             negatives="bn:3,mn:5,tn:3", ranked=True),
)
