"""Cost of the actual-update views (DESIGN.md §2b) in a tracker record, GPT-2-small shape (fp32, CPU).

A record without the views measures the probe Gram (ghost engine), the log-probs and the top-k next
tokens (`Tracker._measure_part`); the views add `actual_delta` (two forward-mode passes, at θ_p on
the saved copy and at θ_q) and `step_delta` with its three optimizer parts (sharing the θ_q pass
through vmap). Both are timed in the same process, alternating, after one AdamW step captured by
the tracker's step pre-hook; the script prints the medians, their ratio (target ≤ 1.5×) and the
memory the views hold (the parameter copy and the captured step, from their tensor sizes) next to
the peak RSS growth while they run.

    python benchmarks/bench_update_views.py                       # 8 probes × 2 responses, 12 layers
    python benchmarks/bench_update_views.py --layers 2 --repeats 1  # a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

import marginscope as ms  # noqa: E402
from marginscope.demo.tiny import build_tokenizer, corpus_lines  # noqa: E402


def _probes(n: int, prompt_words: int, response_words: int) -> ms.probes.ProbeSet:
    words = " ".join(corpus_lines()).split()
    take = lambda start, k: " " + " ".join(words[start:start + k])  # noqa: E731
    return ms.probes.ProbeSet.from_records([
        {"id": f"p{i}", "prompt": take(97 * i, prompt_words).strip(), "chosen": take(97 * i + 40, response_words),
         "rejected": take(97 * i + 70, response_words)} for i in range(n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--response-words", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    model = common.gpt2_small(n_layer=args.layers)
    probes = _probes(args.probes, args.prompt_words, args.response_words)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        tracker = ms.Tracker(model, tokenizer, probes, Path(tmp) / "run.h5", loss="dpo", every=1, top_k=5,
                             optimizer=optimizer)
        indices = list(range(len(probes)))
        rows = [row for e in tracker.encoded for row in e.rows()]
        model.train()
        ms.dynamics.score_rows(model, rows).logp.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        captured = tracker._capture.take(1)
        held = sum(t.numel() * t.element_size() for t in tracker._snapshot.values())
        held += sum(t.numel() * t.element_size() for part in captured.parts.values() for t in part.values())
        base, views = [], []
        rss_before = common.rss_peak_mb()
        for _ in range(args.repeats):
            start = time.perf_counter()
            tracker._measure_part(indices)
            base.append(time.perf_counter() - start)
            start = time.perf_counter()
            tracker._update_part(indices, captured)
            views.append(time.perf_counter() - start)
        rss_growth = common.rss_peak_mb() - rss_before
        tracker.close()
    lengths = tracker.lengths
    b, v = statistics.median(base), statistics.median(views)
    print(f"machine: {common.machine()}")
    print(f"model: GPT-2 shape, {args.layers} layers, {tracker.scope.numel / 1e6:.1f}M parameters in scope; "
          f"{len(probes)} probes × 2 responses, {lengths.min()}–{lengths.max()} response tokens")
    print(f"record without the views (Gram, log-probs, top-k): {b:.2f} s (median of {args.repeats})")
    print(f"actual-update views (actual_delta + step_delta + 3 parts): {v:.2f} s")
    print(f"record with the views / without: {(b + v) / b:.2f}× (target ≤ 1.5×)")
    print(f"held by the views: {held / 2**20:.0f} MiB (the parameter copy + θ_(t−1) shared + 3 step parts; "
          f"one scope copy = {tracker.scope.numel * 4 / 2**20:.0f} MiB); peak RSS growth while timing: "
          f"{rss_growth:.0f} MiB")


if __name__ == "__main__":
    main()
