"""Accuracy at scale: the papers' float32 flatten-and-dot Gram vs the ghost engine, both against
float64 exact, on one probe (3 responses, prompt 32 + response 64 tokens) of a GPT-2-small-shaped
model (124M parameters, random init).

    python benchmarks/accuracy_naive_vs_ghost.py [--layers 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from marginscope.dynamics import exact, ghost  # noqa: E402


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args()
    model = common.gpt2_small(n_layer=args.layers)
    probes = common.random_probes(1, 3, 32, 64, model.config.vocab_size)
    naive32 = common.naive_gram(model, probes)[0]
    scope = exact.select_parameters(model, "all")
    with exact.gradient_scope(model, scope):
        ghost32 = ghost.ghost_gram_chunk(model, probes, scope)[1][0]
    model64 = model.double()
    scope = exact.select_parameters(model64, "all")
    with exact.gradient_scope(model64, scope):
        exact64 = exact.exact_gram_chunk(model64, probes, scope)[1][0]
        ghost64 = ghost.ghost_gram_chunk(model64, probes, scope)[1][0]
    print(f"GPT-2-small shape, {args.layers} layers, {scope.numel:,} parameters; max |K − K_exact64| / max |K_exact64|:")
    print(f"  naive, float32 model, float32 flattened dot (the papers' method): {_rel(naive32, exact64):.2e}")
    print(f"  ghost, float32 model:                                            {_rel(ghost32, exact64):.2e}")
    print(f"  ghost, float64 model:                                            {_rel(ghost64, exact64):.2e}")


if __name__ == "__main__":
    main()
