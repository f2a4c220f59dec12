"""Per-token Gram G[t,s] = ⟨∇log π(w_t|x,w_<t), ∇log π(l_s|x,l_<s)⟩ at 32×32 tokens, per tier.

Model: GPT-2-small widths (d=768, 12 heads), untied LM head, `--layers` blocks (default 2) and a
`--vocab` of 8192, so that the naive baseline's stored per-token gradients fit in memory. Tiers
(`tokens.token_gram`, what `measure(per_token=...)` runs per probe) and what they cover:
  head   the LM head only                      tail   every module after the last attention
  exact  every parameter
Each tier is timed against the naive per-token loop restricted to the same parameters: one backward
per token, flattened gradients, dot products (the papers' method), measured in the same run: the two
alternated `--repeat` times, medians.

    python benchmarks/bench_token_gram.py
    python benchmarks/bench_token_gram.py --tokens 8 --tiers head      # a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TIERS = ("head", "tail", "exact")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32, help="response length of chosen and rejected")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tiers", default=",".join(TIERS))
    p.add_argument("--repeat", type=int, default=3, help="runs of each method, alternated; medians")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _setup(args):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, vocab_size=args.vocab, tie_word_embeddings=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    probe = common.random_probes(1, 2, args.prompt_len, args.tokens, args.vocab)[0]
    return model, probe


def _tier_params(model, tier: str) -> list:
    """The parameters a tier covers, for the naive loop (GPT-2 module names)."""
    last = f"transformer.h.{model.config.n_layer - 1}."
    keep = {"head": lambda n: n.startswith("lm_head."),
            "tail": lambda n: n.startswith(("lm_head.", "transformer.ln_f.", last + "ln_2.", last + "mlp.")),
            "exact": lambda n: True}[tier]
    return [p for n, p in model.named_parameters() if keep(n)]


def _naive(tier: str):
    def run(state):
        import torch

        from marginscope.dynamics.scoring import score_rows
        model, probe = state
        params = _tier_params(model, tier)
        scored = score_rows(model, [(probe.prompt_ids, probe.response_ids[0]), (probe.prompt_ids, probe.response_ids[1])])
        flat = lambda out: torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params, retain_graph=True)])  # noqa: E731
        gw = torch.stack([flat(scored.token_logp[0, t]) for t in range(len(probe.response_ids[0]))])
        gram = torch.stack([gw @ flat(scored.token_logp[1, s]) for s in range(len(probe.response_ids[1]))], 1)
        return gram.double().tolist()
    return run


def _tier(tier: str):
    def run(state):
        from marginscope.dynamics import tokens
        from marginscope.dynamics.exact import gradient_scope, select_parameters
        model, probe = state
        scope = select_parameters(model, "all")
        with gradient_scope(model, scope):
            gram, _, _ = tokens.token_gram(model, probe, scope, tier)
        return gram.tolist()
    return run


METHODS = {**{t: _tier(t) for t in TIERS}, **{f"naive-{t}": _naive(t) for t in TIERS}}


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        common.run_worker(lambda: _setup(args), METHODS, args.worker)
        return
    import numpy as np
    forwarded = [f"--tokens={args.tokens}", f"--prompt-len={args.prompt_len}", f"--layers={args.layers}",
                 f"--vocab={args.vocab}"]
    print(f"per-token Gram · GPT-2 widths, {args.layers} layers, vocab {args.vocab}, untied · "
          f"{args.tokens}×{args.tokens} tokens, prompt {args.prompt_len} · fp32 CPU · median of {args.repeat} runs "
          "per method, alternated, each in a fresh process")
    print(f"machine: {common.machine()}")
    print(f"{'tier':6} {'naive s':>9} {'tier s':>9} {'× naive':>9} {'naive MB':>9} {'tier MB':>9} {'rel diff':>9}")
    for tier in args.tiers.split(","):
        runs = {"naive": [], "tier": []}
        for rep in range(args.repeat):  # alternate the order between repeats; medians
            for kind in ("naive", "tier") if rep % 2 == 0 else ("tier", "naive"):
                runs[kind].append(common.spawn(__file__, f"naive-{tier}" if kind == "naive" else tier, forwarded))
        naive, fast = (min(r, key=lambda x: x["seconds"]) for r in (runs["naive"], runs["tier"]))
        t_naive, t_tier = (statistics.median(x["seconds"] for x in r) for r in (runs["naive"], runs["tier"]))
        ref, got = np.array(naive["result"]), np.array(fast["result"])
        diff = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{tier:6} {t_naive:9.2f} {t_tier:9.2f} {t_naive / t_tier:9.1f} "
              f"{naive['peak_extra_mb']:9.0f} {fast['peak_extra_mb']:9.0f} {diff:9.1e}")


if __name__ == "__main__":
    main()
