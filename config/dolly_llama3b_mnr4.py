# Negative-type ablation, Dolly x OpenLlama-3B, MNR: 4 mean-field negatives, ranked, 200 steps.
from paper import dolly_llama3b

config = dict(dolly_llama3b, objective="cpo", negatives="mn:4", ranked=True, steps=200, out_dir="out/dolly_llama3b_mnr4")
