"""How well each view explains what happened, on the demo setting (DESIGN.md §2b; issue "explain what
actually happened").

The embedded demo's recipe (tiny GPT-2 SFT'd on the sentiment corpus, cached; DPO with AdamW 5e-4,
batch 8, 16 held-out probes per style) is run with a record every step and every 4 steps; for each,
per response, the script prints Pearson r, slope and sign agreement against the observed change of
  self view     the paper's prediction at record s (one plain SGD step on the pair alone, per unit
                learning rate) against the observed change s → s+1;
  actual update the trapezoid first order ½⟨a(θ_p) + a(θ_q), θ_q − θ_p⟩ of the same interval;
and the agreement of the three Case views (self at the interval's start, actual, observed).

    python benchmarks/explain_demo.py                       # the long style, every 1 and 4 (minutes)
    python benchmarks/explain_demo.py --styles single,short,long --out /tmp/explain
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from marginscope.demo.recipe import DemoConfig, sft_model, style_run
from marginscope.dynamics.summary import case_agreement, first_order_fit
from marginscope.trace import open_trace


def _report(path: Path, style: str, every: int) -> None:
    with open_trace(path) as tr:
        names, predicted, observed, actual = tr.names, tr.predicted_delta, tr.observed_delta, tr.actual_delta
        case, case_obs, case_act = tr.case, tr.case_observed, tr.case_actual
    print(f"\n{style} style, a record every {every} step(s): {len(observed) - 1} intervals × {observed.shape[1]} probes")
    print(f"{'response':<10} {'view':<14} {'r':>7} {'slope':>9} {'sign':>6}")
    for j, name in enumerate(names):
        for view, fit in (("self view", first_order_fit(predicted[:-1, :, j], observed[1:, :, j])),
                          ("actual update", first_order_fit(actual[1:, :, j], observed[1:, :, j]))):
            print(f"{name:<10} {view:<14} {fit.r:>7.3f} {fit.slope:>9.3g} {fit.sign_agreement:>6.0%}")
    print(f"Case agreement: self/observed {case_agreement(case[:-1], case_obs[1:]):.0%}, "
          f"actual/observed {case_agreement(case_act[1:], case_obs[1:]):.0%}, "
          f"self/actual {case_agreement(case[:-1], case_act[1:]):.0%}; "
          f"self view Case 1 {np.mean(case[:-1] == 1):.0%}, observed Case 1 {np.mean(case_obs[1:] == 1):.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--styles", default="long")
    p.add_argument("--every", default="1,4")
    p.add_argument("--out", type=Path, default=None, help="folder for the SFT cache and traces (default: temp)")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        config = DemoConfig()
        sft, tokenizer, _ = sft_model(config, out / "sft-model")
        for style in args.styles.split(","):
            for every in (int(e) for e in args.every.split(",")):
                run_dir = out / f"every{every}"
                run_dir.mkdir(exist_ok=True)
                trace = style_run(replace(config, every=every), style, sft, tokenizer, run_dir)
                _report(trace, style, every)


if __name__ == "__main__":
    main()
