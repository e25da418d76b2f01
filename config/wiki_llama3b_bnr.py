# Wiki x OpenLlama-3B, BNR: 4 batch negatives, ranked loss eq. (2); sweep alpha with evaluate.py interpolate.
from paper import wiki_llama3b

config = dict(wiki_llama3b,
              objective="cpo",
              negatives="bn:4",
              ranked=True,
              out_dir="out/wiki_llama3b_bnr")
