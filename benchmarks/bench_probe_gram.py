"""Probe Gram K[i,j] = ⟨∇log π(y_i|x), ∇log π(y_j|x)⟩ on a GPT-2-small-shaped model (fp32, CPU).

Default workload (issue 3): 8 probes × 3 responses, prompt 32 + response 64 tokens. Methods:
  naive  the papers' code: one forward+backward per response, flattened gradients, dot products
  exact  marginscope's oracle engine (one batched forward, one backward per response)
  ghost  marginscope's ghost engine (one forward + one backward per chunk, no P-sized tensor)
Each method runs in its own subprocess; the script prints seconds, the ratio against naive measured
in the same run, peak extra memory (RSS above the loaded model) and the max relative difference of
its Gram from the exact engine's (float64 accumulation).

    python benchmarks/bench_probe_gram.py                   # the issue's workload (minutes)
    python benchmarks/bench_probe_gram.py --layers 2 --probes 2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--responses", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--methods", default="naive,exact,ghost")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _setup(args):
    model = common.gpt2_small(n_layer=args.layers)
    probes = common.random_probes(args.probes, args.responses, args.prompt_len, args.response_len,
                                  model.config.vocab_size)
    return model, probes


def _engine(name: str):
    def run(state):
        import importlib

        from marginscope.dynamics import exact
        model, probes = state
        scope = exact.select_parameters(model, "all")
        chunk_fn = getattr(importlib.import_module(f"marginscope.dynamics.{name}"), f"{name}_gram_chunk")
        with exact.gradient_scope(model, scope):
            _, grams = chunk_fn(model, probes, scope)
        return [g.tolist() for g in grams]
    return run


METHODS = {
    "naive": lambda state: [g.tolist() for g in common.naive_gram(*state)],
    "exact": _engine("exact"),
    "ghost": _engine("ghost"),
}


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        common.run_worker(lambda: _setup(args), METHODS, args.worker)
        return
    import numpy as np
    forwarded = [f"--probes={args.probes}", f"--responses={args.responses}", f"--prompt-len={args.prompt_len}",
                 f"--response-len={args.response_len}", f"--layers={args.layers}"]
    results = {m: common.spawn(__file__, m, forwarded) for m in args.methods.split(",")}
    # the exact engine accumulates in float64; naive's float32 dot of P-long vectors is off by ~1e-3
    ref_name = "exact" if "exact" in results else "naive"
    reference = np.array(results[ref_name]["result"])
    print(f"probe Gram · GPT-2-small shape, {args.layers} layers · {args.probes} probes × {args.responses} "
          f"responses · prompt {args.prompt_len} + response {args.response_len} tokens · fp32 CPU")
    print(f"machine: {common.machine()}")
    print(f"{'method':8} {'seconds':>9} {'× naive':>9} {'peak extra MB':>14} {'rel diff vs ' + ref_name:>17}")
    for name, r in results.items():
        speed = results["naive"]["seconds"] / r["seconds"] if "naive" in results else float("nan")
        diff = np.abs(np.array(r["result"]) - reference).max() / np.abs(reference).max()
        print(f"{name:8} {r['seconds']:9.2f} {speed:9.2f} {r['peak_extra_mb']:14.0f} {diff:17.2e}")


if __name__ == "__main__":
    main()
