# Negative-type ablation, Dolly x OpenLlama-3B, BNR: 4 batch negatives, ranked, 200 steps from the
# 1000-step MLE model (§5.1, Figure 1: dolly_llama3b_sft1000.py), which is also its pi_ref.
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="cpo",
              negatives="bn:4",
              ranked=True,
              steps=200,
              init_from="out/dolly_llama3b_sft1000/final",
              out_dir="out/dolly_llama3b_bnr4")
