# Dolly x OpenLlama-3B, PSS: parallel scheduled sampling, 3 samples per example, p = 0.5.
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="pss",
              pss_samples=3,
              pss_p=0.5,
              out_dir="out/dolly_llama3b_pss")
