"""Cost of the per-pair attribution (issue 12) on a DPO step, GPT-2-small shape, fp32, CPU.

Methods, alternated in one process on one model (the order rotated every round), medians of `--steps`:
  plain        forward of the 2P rows, DPO loss, backward, AdamW step
  inrun        the same step inside `InRunGeometry` (exact pair geometry; the tracker's every step)
  attribution  the same with `pair_gradients=True`: every pair's gradient materialized during the
               backward (the tracker's step before a record)
  record       what the record then adds: u_j = c_t ⊙ g_j and one forward-mode directional derivative
               per pair over the N probes (`directional_logp`, four pairs per vmapped pass)
Scopes: `lora` (PEFT LoRA r=8 on every attention and MLP projection; the model frozen) or `full`.
Prints each method's seconds and its ratio to the plain step, the pair-gradient buffers' size and the
process's peak RSS.

    python benchmarks/bench_attribution.py --scope lora
    python benchmarks/bench_attribution.py --scope full --steps 2
    python benchmarks/bench_attribution.py --layers 2 --steps 1     # a quick smoke run
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
    p.add_argument("--scope", choices=("lora", "full"), default="lora")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=3)
    return p


def _model(args):
    model = common.gpt2_small(n_layer=args.layers).train()
    if args.scope == "full":
        return model
    import peft
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return peft.get_peft_model(model, config)


def _record(model, probes, gradients, opt):
    """The record's share: tangents c ⊙ g_j from the optimizer's current state, then their derivatives."""
    from marginscope.dynamics.attribution import pair_tangents
    from marginscope.dynamics.exact import select_parameters
    from marginscope.dynamics.optimizers import adam_step_split
    from marginscope.dynamics.update import directional_logp

    scope = select_parameters(model, "trainable")
    now = {n: p.detach() for n, p in zip(scope.names, scope.params)}
    group = opt.param_groups[0]
    coefficient = {n: adam_step_split(p, gradients[n].sum(0), opt.state.get(p, {}), group).coefficient
                   for n, p in zip(scope.names, scope.params)}
    n_pairs = next(iter(gradients.values())).shape[0]
    for start in range(0, n_pairs, 4):
        tangents = pair_tangents(gradients, coefficient, range(start, min(n_pairs, start + 4)), like=now)
        directional_logp(model, probes, tangents, batch_size=8)


def main() -> None:
    args = _parser().parse_args()
    import torch

    torch.manual_seed(0)
    model = _model(args)
    vocab = model.config.vocab_size
    pairs = common.random_probes(args.pairs, 2, args.prompt_len, args.response_len, vocab)
    probes = common.random_probes(args.probes, 2, args.prompt_len // 2, args.response_len, vocab, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scope_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    methods = ("plain", "inrun", "attribution")
    times: dict[str, list[float]] = {m: [] for m in (*methods, "record")}
    result = None
    for mode in methods:  # warm-up
        result = common.dpo_step(model, pairs, opt, mode)
    for i in range(args.steps):
        order = methods[i % 3:] + methods[:i % 3]
        for mode in order:
            start = time.perf_counter()
            out = common.dpo_step(model, pairs, opt, mode)
            times[mode].append(time.perf_counter() - start)
            if mode == "attribution":
                result = out
        model.eval()
        start = time.perf_counter()
        _record(model, probes, result.gradients, opt)
        times["record"].append(time.perf_counter() - start)
        model.train()
    med = {m: statistics.median(t) for m, t in times.items()}
    buffers = sum(g.numel() * g.element_size() for g in result.gradients.values())
    print(f"DPO step · GPT-2-small shape, {args.layers} layers · scope {args.scope} ({scope_numel / 1e6:.2f}M "
          f"parameters) · {args.pairs} pairs × {args.prompt_len + args.response_len} tokens · record over "
          f"{args.probes} probes × 2 responses · fp32 CPU · methods alternated, median of {args.steps}")
    print(f"machine: {common.machine()}")
    print(f"{'method':12} {'s':>8} {'× plain step':>13}")
    for name, value in med.items():
        print(f"{name:12} {value:8.2f} {value / med['plain']:13.2f}")
    print(f"pair-gradient buffers: {buffers / 2**20:.1f} MiB ({args.pairs} pairs × the scope, float32); "
          f"peak RSS of the process: {common.rss_peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
