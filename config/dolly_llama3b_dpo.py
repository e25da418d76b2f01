# Dolly x OpenLlama-3B, DPO: one LLM-written unhelpful response per prompt
# (python evaluate.py dpo-negatives).
from paper import dolly_llama3b

config = dict(dolly_llama3b,
              objective="dpo",
              dpo_rejected="out/dolly_dpo_rejected.jsonl",
              micro_batch_size=4,
              out_dir="out/dolly_llama3b_dpo")
