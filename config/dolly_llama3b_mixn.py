# Dolly x OpenLlama-3B, MixN: 3 BN + 5 MN + 3 TN negatives, unranked loss eq. (1).
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="cpo",
              negatives="bn:3,mn:5,tn:3",
              ranked=False,
              out_dir="out/dolly_llama3b_mixn")
