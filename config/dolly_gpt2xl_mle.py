# Dolly x GPT2-XL, MLE: continued next-token training for the same 1000 steps.
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              objective="mle",
              micro_batch_size=8,
              out_dir="out/dolly_gpt2xl_mle")
