"""Overhead of in-run pair geometry on a DPO training step (GPT-2-small shape, fp32, CPU).

Default workload (issue 3): 4 pairs, 128 tokens per row (prompt 64 + response 64). Methods:
  plain   forward of the 8 rows, DPO loss, backward, AdamW step
  inrun   the same step inside `InRunGeometry` (exact ⟨a_w,a_l⟩, ‖a_w‖², ‖a_l‖² of every pair)
  naive   the same step, then the papers' per-pair geometry: one extra forward+backward per
          response with flattened gradients (what one would do without marginscope)
Each method runs in its own subprocess: 1 warm-up step, then the median of `--steps` timed steps.

    python benchmarks/bench_inrun_step.py
    python benchmarks/bench_inrun_step.py --layers 2 --steps 2     # a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", default="plain,inrun,naive")
    p.add_argument("--alternate", action="store_true",
                   help="time plain and inrun steps alternated in one process (robust to machine load)")
    p.add_argument("--clock", choices=common.CLOCKS, default="wall", help=common.CLOCK_HELP)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _setup(args):
    import torch
    model = common.gpt2_small(n_layer=args.layers).train()
    pairs = common.random_probes(args.pairs, 2, args.prompt_len, args.response_len, model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    global _clock
    _clock = common.clock(args.clock)
    return model, pairs, opt, args.steps


_clock = time.perf_counter


def _step(model, pairs, opt, geometry: bool):
    result = common.dpo_step(model, pairs, opt, "inrun" if geometry else "plain")
    return result.cosine.tolist() if result else None


def _timed(kind: str):
    def run(state):
        model, pairs, opt, steps = state
        _step(model, pairs, opt, kind == "inrun")  # warm-up
        times = []
        for _ in range(steps):
            start = _clock()
            _step(model, pairs, opt, kind == "inrun")
            if kind == "naive":
                common.naive_gram(model, pairs)
            times.append(_clock() - start)
        return statistics.median(times)
    return run


def _alternated(state):
    """plain and inrun steps alternated in one process on one model (the order flipped every round):
    their medians, so machine load hits both alike."""
    model, pairs, opt, steps = state
    times = {"plain": [], "inrun": []}
    for kind in times:  # warm-up
        _step(model, pairs, opt, kind == "inrun")
    for i in range(steps):
        for kind in ("plain", "inrun") if i % 2 == 0 else ("inrun", "plain"):
            start = _clock()
            _step(model, pairs, opt, kind == "inrun")
            times[kind].append(_clock() - start)
    return {kind: statistics.median(t) for kind, t in times.items()}


METHODS = {**{name: _timed(name) for name in ("plain", "inrun", "naive")}, "alternated": _alternated}


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        common.run_worker(lambda: _setup(args), METHODS, args.worker)
        return
    forwarded = [f"--pairs={args.pairs}", f"--prompt-len={args.prompt_len}", f"--response-len={args.response_len}",
                 f"--layers={args.layers}", f"--steps={args.steps}", f"--clock={args.clock}"]
    methods = args.methods.split(",")
    if args.alternate and "plain" in methods and "inrun" in methods:
        both = common.spawn(__file__, "alternated", forwarded)
        rest = {m: common.spawn(__file__, m, forwarded) for m in methods if m not in ("plain", "inrun")}
        results = {m: {"result": both["result"][m], "peak_extra_mb": both["peak_extra_mb"]} for m in ("plain", "inrun")}
        results.update(rest)
    else:
        results = {m: common.spawn(__file__, m, forwarded) for m in methods}
    how = ("plain and inrun alternated in one process (peak MB: of both)" if args.alternate
           else "each method in its own process")
    print(f"DPO step · GPT-2-small shape, {args.layers} layers · {args.pairs} pairs × "
          f"{args.prompt_len + args.response_len} tokens · fp32 CPU · {args.clock} seconds, median of {args.steps} steps · "
          f"{how}")
    print(f"machine: {common.machine()}")
    print(f"{'method':8} {'s/step':>9} {'× plain':>9} {'peak extra MB':>14}")
    for name, r in results.items():
        ratio = r["result"] / results["plain"]["result"] if "plain" in results else float("nan")
        print(f"{name:8} {r['result']:9.2f} {ratio:9.2f} {r['peak_extra_mb']:14.0f}")


if __name__ == "__main__":
    main()
