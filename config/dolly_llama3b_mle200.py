# Negative-type ablation, Dolly x OpenLlama-3B: the baseline of Figure 1 (§5.1). MLE continued for the same
# 200 steps from the same 1000-step MLE model (dolly_llama3b_sft1000.py) as BNR4, TNR4 and MNR4.
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="mle",
              steps=200,
              micro_batch_size=8,
              init_from="out/dolly_llama3b_sft1000/final",
              out_dir="out/dolly_llama3b_mle200")
