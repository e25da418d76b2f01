# Dolly x OpenLlama-3B: the MLE (SFT) stage, 2000 steps from the pretrained weights;
# pi_ref of every run below.
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              init_from="openlm-research/open_llama_3b",
              objective="mle",
              steps=2000,
              micro_batch_size=8,
              out_dir="out/dolly_llama3b_sft")
