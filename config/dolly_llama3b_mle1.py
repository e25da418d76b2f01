# Dolly x OpenLlama-3B, MLE_1 of Table 2: continued next-token training for 200 steps
# (the length of ANR and AN).
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="mle",
              steps=200,
              micro_batch_size=8,
              out_dir="out/dolly_llama3b_mle1")
