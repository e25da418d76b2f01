# Dolly x GPT2-XL: the MLE (SFT) stage, 2000 steps from the pretrained weights; pi_ref of every run below.
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              init_from="gpt2-xl",
              objective="mle",
              steps=2000,
              micro_batch_size=8,
              out_dir="out/dolly_gpt2xl_sft")
