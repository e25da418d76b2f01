# Settings shared by the paper's runs (Feng et al. 2024, "Training recipe"): AdamW, lr 1e-5, weight
# decay 0.05, batch 64, beta 5, 11 negatives; MLE (SFT) 2000 steps, then CPO and the baselines 1000 steps
# from that SFT model. Each preset beside this file imports one of these and adds its objective.
# Not stated in the paper, chosen here: max_len 512, constant lr after 50 warm-up steps, grad clip 1.0.

common = dict(lr=1e-5, weight_decay=0.05, batch_size=64, beta=5.0, max_len=512, warmup_steps=50,
              schedule="constant", grad_clip=1.0, log_interval=10, eval_interval=200, ckpt_interval=200)

dolly_gpt2xl = dict(common,
                    task="dolly",
                    init_from="out/dolly_gpt2xl_sft/final",
                    steps=1000,
                    micro_batch_size=2)
# Memory (python train.py PRESET --plan --plan_world_size=8): on 8 x A100-80GB every OpenLlama-3B run
# needs --fsdp (the CPO runs ~134 GiB per GPU under DDP, 61 GiB sharded); GPT2-XL runs use DDP where the
# plan leaves >= 20% of the 80 GiB free, and --fsdp otherwise (its CPO runs: 69 GiB under DDP, 36 GiB
# sharded).
dolly_llama3b = dict(common,
                     task="dolly",
                     init_from="out/dolly_llama3b_sft/final",
                     steps=1000,
                     micro_batch_size=2,
                     fsdp=True)
# Wikipedia: one document per line, jsonl {"text": ...} or plain text, at this path or an http(s) URL
wiki_llama3b = dict(common,
                    task="wiki:data/wikipedia.jsonl",
                    init_from="out/wiki_llama3b_sft/final",
                    steps=1000,
                    micro_batch_size=2,
                    fsdp=True)
