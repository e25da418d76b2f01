"""
Benchmarks: speed and memory of nanoCPO against a baseline measured in the same process.
Every number printed is a ratio against that baseline, so the machine's speed cancels out.

    python bench.py model       # forward+backward and greedy decoding vs transformers
    python bench.py loss        # peak memory of the three log-prob paths
    python bench.py negatives   # autoregressive-negative throughput vs transformers' sampling
    python bench.py train       # one CPO step (K = 12) vs one MLE step
"""
import sys
import time

import torch


def timeit(fn, warmup=1, repeat=3):
    """Best wall time of `repeat` calls of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------- model
# (bench_model goes here)

# ----------------------------------------------------------------------------- loss
# (bench_loss goes here)

# ----------------------------------------------------------------------------- negatives
# (bench_negatives goes here)

# ----------------------------------------------------------------------------- train
# (bench_train goes here)


if __name__ == "__main__":
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    which = sys.argv[1:] or list(benches)
    for name in which:
        if name not in benches:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(benches)}")
        torch.manual_seed(0)
        benches[name]()
