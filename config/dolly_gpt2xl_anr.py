# Dolly x GPT2-XL, ANR: 11 autoregressive negatives (python negatives.py --spec an:11), ranked loss eq. (2).
from paper import dolly_gpt2xl

config = dict(dolly_gpt2xl,
              objective="cpo",
              negatives="an:11",
              ranked=True,
              an_cache="out/dolly_gpt2xl_an",
              out_dir="out/dolly_gpt2xl_anr",
              fsdp=True)  # 69 GiB per GPU under DDP: sharded for headroom on 80 GB (paper.py)
