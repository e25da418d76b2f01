# Dolly x GPT2-XL, PSS: parallel scheduled sampling, 3 samples per example, p = 0.5.
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              objective="pss",
              pss_samples=3,
              pss_p=0.5,
              out_dir="out/dolly_gpt2xl_pss")
