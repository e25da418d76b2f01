# Wiki x OpenLlama-3B: the MLE (SFT) stage, 2000 steps from the pretrained weights; pi_ref of the runs below.
from paper import wiki_llama3b

config = dict(wiki_llama3b,
              init_from="openlm-research/open_llama_3b",
              objective="mle",
              steps=2000,
              micro_batch_size=8,
              out_dir="out/wiki_llama3b_sft")
