# Dolly x GPT2-XL, DPO: one LLM-written unhelpful response per prompt (python evaluate.py dpo-negatives).
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              objective="dpo",
              dpo_rejected="out/dolly_dpo_rejected.jsonl",
              micro_batch_size=4,
              out_dir="out/dolly_gpt2xl_dpo")
