# Wiki x OpenLlama-3B, MLE: continued next-token training for the same 1000 steps.
from paper import wiki_llama3b

config = dict(wiki_llama3b,
              objective="mle",
              micro_batch_size=8,
              out_dir="out/wiki_llama3b_mle")
