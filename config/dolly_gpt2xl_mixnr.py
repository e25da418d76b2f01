# Dolly x GPT2-XL, MixNR: 3 BN + 5 MN + 3 TN negatives, ranked loss eq. (2);
# sweep alpha with evaluate.py interpolate.
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              objective="cpo",
              negatives="bn:3,mn:5,tn:3",
              ranked=True,
              out_dir="out/dolly_gpt2xl_mixnr",
              fsdp=True)  # 69 GiB per GPU under DDP: sharded for headroom on 80 GB (paper.py)
