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

import torch

from marginscope.demo.recipe import DemoConfig, sft_model, style_run
from marginscope.trace import open_trace
from marginscope.trace.summary import agreement, agreement_tables, intervals


def _report(path: Path, style: str, every: int) -> None:
    with open_trace(path) as tr:
        summary, n_probes = agreement(intervals(tr), tr.names), len(tr.probe_ids)
    print(f"\n{style} style, a record every {every} step(s): {summary['intervals']} intervals × {n_probes} probes")
    for title, header, rows, caption in agreement_tables(summary):
        print(f"{title}\n  " + " | ".join(header))
        for row in rows:
            print("  " + " | ".join(row))
        print(f"  ({caption})")


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
