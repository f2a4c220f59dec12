"""What sharing each probe's prompt across its responses could save the probe Gram, at the floor.

The probe Gram needs, for every layer, its inputs and its output cotangents of each response. A
prompt shared by R responses can be forwarded once (the KV cache of its first P − 1 tokens, repeated
for the R responses), but its cotangents differ per response (each response reaches the prompt
through attention), so its backward stays per response: R cotangents through the one-row prompt
graph (`is_grads_batched`). This script times that scheme against the same work on full rows, both
without parameter gradients (every parameter frozen; leaves at the token embeddings' output, as
`bench_floor.py`'s floor (a)), in one process, alternated, medians; and checks that the shared
scheme's per-response cotangents at the prompt's and the responses' embeddings equal the full rows'.

  full     the R rows of every probe (prompt + response) forwarded and backpropagated
  shared   each prompt's first P − 1 tokens forwarded once (batch of the probes), the responses (the
           prompt's last token + the response) forwarded on its repeated KV cache, backpropagated to
           the cache and the responses' embeddings, then the cache's R cotangents per probe through
           the prompt graph in one batched backward

Model: GPT-2-small shape (random init, vocab 50257), `--layers` blocks.

    python benchmarks/bench_prompt_sharing.py --threads 1 --clock cpu
    python benchmarks/bench_prompt_sharing.py --layers 2 --probes 2 --repeat 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--probes", type=int, default=8, help="one chunk, as measure runs them")
    p.add_argument("--responses", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=common.CLOCKS, default="wall", help=common.CLOCK_HELP)
    return p


class _Leaves:
    """The token embeddings' output made a leaf on every forward (an activation-only backward ends there)."""

    def __init__(self, model):
        self.leaves: list[torch.Tensor] = []
        model.get_input_embeddings().register_forward_hook(self._leaf)

    def _leaf(self, module, args, out):
        out = out.detach().requires_grad_()
        self.leaves.append(out)
        return out


def _logp(logits, targets):
    return logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0].double().sum()


def _full(model, probes, leaves):
    """Per-row cotangents of the embeddings' output [B, P + T, d] (rows probe-major)."""
    leaves.leaves.clear()
    p = len(probes[0].prompt_ids)
    ids = torch.tensor([list(pr.prompt_ids) + list(r) for pr in probes for r in pr.response_ids])
    keep = torch.arange(p - 1, ids.shape[1] - 1)[None].expand(len(ids), -1)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    return torch.autograd.grad(_logp(logits, ids[:, p:]), leaves.leaves)[0]


def _shared(model, probes, leaves):
    """The same cotangents from the shared scheme: prompt part [R, N, P − 1, d], response part [B, T, d]."""
    from transformers import DynamicCache
    leaves.leaves.clear()
    n, r, p = len(probes), len(probes[0].response_ids), len(probes[0].prompt_ids)
    prompts = torch.tensor([list(pr.prompt_ids[:-1]) for pr in probes])
    kv = [(layer.keys, layer.values) for layer in model(input_ids=prompts, use_cache=True).past_key_values.layers]
    repeated = [tuple(t.detach().repeat_interleave(r, 0).requires_grad_() for t in pair) for pair in kv]
    cache = DynamicCache()
    for i, (k, v) in enumerate(repeated):
        cache.update(k, v, i)
    responses = torch.tensor([[pr.prompt_ids[-1], *y[:-1]] for pr in probes for y in pr.response_ids])
    t = responses.shape[1]
    logits = model(input_ids=responses, cache=cache, use_cache=True,
                   position_ids=torch.arange(p - 1, p - 1 + t)[None].expand(len(responses), -1),
                   attention_mask=torch.ones(len(responses), p - 1 + t, dtype=torch.long)).logits
    targets = torch.tensor([list(y) for pr in probes for y in pr.response_ids])
    flat = [x for pair in repeated for x in pair]
    grads = torch.autograd.grad(_logp(logits, targets), [*flat, leaves.leaves[1]])
    per_response = [g.view(n, r, *g.shape[1:]).transpose(0, 1) for g in grads[:-1]]  # [R, N, ...]
    prompt = torch.autograd.grad([x for pair in kv for x in pair], leaves.leaves[0], per_response,
                                 is_grads_batched=True)[0]
    return prompt, grads[-1]


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    model = common.gpt2_small(n_layer=args.layers)
    for param in model.parameters():
        param.requires_grad_(False)
    probes = common.random_probes(args.probes, args.responses, args.prompt_len, args.response_len,
                                  model.config.vocab_size)
    leaves = _Leaves(model)
    clock = common.clock(args.clock)
    run = {"full": _full, "shared": _shared}
    out = {m: f(model, probes, leaves) for m, f in run.items()}  # warm-up, and the exactness check
    n, r, p = args.probes, args.responses, args.prompt_len
    full = out["full"].view(n, r, p + args.response_len, -1)
    prompt, response = out["shared"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    diff_prompt = rel(prompt, full[:, :, :p - 1].transpose(0, 1))
    diff_response = rel(response.view(n, r, args.response_len, -1), full[:, :, p - 1:-1])
    times: dict[str, list[float]] = {m: [] for m in run}
    for rep in range(args.repeat):
        for m in run if rep % 2 == 0 else list(run)[::-1]:
            start = clock()
            run[m](model, probes, leaves)
            times[m].append(clock() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"prompt sharing at the floor · GPT-2-small shape, {args.layers} layers, random init · {n} probes × {r} "
          f"responses · prompt {p} + response {args.response_len} tokens · fp32 CPU · {args.clock} seconds, "
          f"median of {args.repeat}, alternated")
    print(f"machine: {common.machine()}")
    print(f"{'method':8} {'median s':>9} {'runs s':>24} {'÷ full':>8}")
    for m in run:
        print(f"{m:8} {med[m]:9.2f} {' '.join(f'{t:.2f}' for t in times[m]):>24} {med[m] / med['full']:8.3f}")
    print(f"per-response cotangents, shared vs full rows: max relative difference {diff_prompt:.1e} (prompt), "
          f"{diff_response:.1e} (responses)")


if __name__ == "__main__":
    main()
