# Dolly x OpenLlama-3B, AN: 11 autoregressive negatives, unranked loss eq. (1); 200 steps
# (Table 2: "MLE_1, ANR and AN are trained for 200 steps, the rest 1000").
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="cpo",
              negatives="an:11",
              ranked=False,
              an_cache="out/dolly_llama3b_an",
              steps=200,
              out_dir="out/dolly_llama3b_an")
