# Dolly x OpenLlama-3B, ANR: 11 autoregressive negatives, ranked loss eq. (2).
from paper import dolly_llama3b

config = dict(dolly_llama3b, objective="cpo", negatives="an:11", ranked=True, an_cache="out/dolly_llama3b_an", out_dir="out/dolly_llama3b_anr")
