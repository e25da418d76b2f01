# Dolly x OpenLlama-3B: the negative-type ablation's start (§5.1, Figure 1: "first train ... with MLE loss
# for 1000 steps, then ... CPO for 200 steps"): MLE from the pretrained weights, 1000 steps;
# pi_ref of bnr4/tnr4/mnr4.
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              init_from="openlm-research/open_llama_3b",
              objective="mle",
              steps=1000,
              micro_batch_size=8,
              out_dir="out/dolly_llama3b_sft1000")
