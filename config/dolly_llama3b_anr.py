# Dolly x OpenLlama-3B, ANR: 11 autoregressive negatives, ranked loss eq. (2);
# 200 steps (Table 2, as MLE_1 and AN).
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="cpo",
              negatives="an:11",
              ranked=True,
              an_cache="out/dolly_llama3b_an",
              steps=200,
              out_dir="out/dolly_llama3b_anr")
