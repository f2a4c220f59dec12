"""The per-layer ghost/materialize switch at long responses: is the rule's choice the faster one?

For one linear layer's factors (X [R, T, d_in], D [R, T, d_out], random fp32) of one probe's R
responses, `pair_gram` is timed both ways — ghost Σ (D_a D_bᵀ) ⊙ (X_a X_bᵀ) and materialized
⟨D_aᵀX_a, D_bᵀX_b⟩ — at T = 512 … 2048 tokens per row, on the layer shapes of GPT-2-small, SmolLM2-135M
and a LoRA adapter (r = 8). The two are alternated, repeated (`--repeat`), medians; printed with the
choice of the rule in `contract._materializes` (materialize when R·T·(d_in + d_out) > 2·d_in·d_out)
and of the earlier rule (2·T² > d_in·d_out), and whether each picked the faster.

    python benchmarks/bench_materialize_switch.py
    python benchmarks/bench_materialize_switch.py --tokens 512 --repeat 1      # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from marginscope.dynamics.ghost import Outer, pair_gram  # noqa: E402
from marginscope.dynamics.ghost.contract import _materializes  # noqa: E402

SHAPES = {  # (d_in, d_out)
    "gpt2 attn c_attn": (768, 2304), "gpt2 mlp c_fc": (768, 3072), "gpt2 attn c_proj": (768, 768),
    "smollm2 q_proj": (576, 576), "smollm2 k_proj": (576, 192), "smollm2 gate_proj": (576, 1536),
    "lora A (r=8)": (768, 8), "lora B (r=8)": (8, 768),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="512,1024,2048")
    p.add_argument("--responses", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    r = args.responses
    rows = torch.arange(r)[None]
    print(f"ghost vs materialized pair_gram · one linear layer, {r} rows of T tokens · fp32 factors, float64 "
          f"sums · median of {args.repeat}, alternated")
    print(f"machine: {common.machine()}")
    print(f"{'layer':18} {'T':>5} {'ghost s':>8} {'mat s':>8} {'ghost/mat':>9} {'faster':>7} {'rule':>6} "
          f"{'old rule':>8} {'rel diff':>9}")
    for t in map(int, args.tokens.split(",")):
        for name, (d_in, d_out) in SHAPES.items():
            x = torch.randn(r, t, d_in, generator=gen)
            d = torch.randn(r, t, d_out, generator=gen)
            u = Outer(d, x)
            times = {True: [], False: []}
            out = {}
            for rep in range(args.repeat):
                for mat in (True, False) if rep % 2 == 0 else (False, True):
                    start = time.perf_counter()
                    out[mat] = pair_gram(u, u, rows, mat)
                    times[mat].append(time.perf_counter() - start)
            g, m = statistics.median(times[False]), statistics.median(times[True])
            rule, old = _materializes(u, u, None, r), 2 * t * t > d_in * d_out
            diff = float((out[True] - out[False]).abs().max() / out[False].abs().max())
            print(f"{name:18} {t:5} {g:8.3f} {m:8.3f} {g / m:9.2f} {'mat' if m < g else 'ghost':>7} "
                  f"{'mat' if rule else 'ghost':>6} {'mat' if old else 'ghost':>8} {diff:9.1e}")


if __name__ == "__main__":
    main()
