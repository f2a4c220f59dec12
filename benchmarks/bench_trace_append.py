"""Cost of appending to a trace while training runs: `TraceWriter.append` (one record) and
`TraceWriter.append_inrun` (one training step's pairs), each followed by its SWMR flushes.

Default workload: 64 probes × 3 responses, responses of 16–64 tokens (T = 64), top_k = 5, per-token
Gram of 4 probes, 16 in-run pairs per step; 5 warm-up then 50 timed appends. Random values (the
pessimistic case for compression). Methods — the compression of the per-token record datasets
(token_logp, topk_ids, topk_prob):
  gzip   the shipped layout: gzip level 1 + byte shuffle
  lzf    lzf + byte shuffle (h5py's filter: unreadable by non-h5py HDF5 tools)
  none   uncompressed
Each method runs in its own subprocess and writes to a fresh file in a temporary folder. KiB/step is
the file growth per step with one record and its in-run rows (header excluded).

    python benchmarks/bench_trace_append.py
    python benchmarks/bench_trace_append.py --appends 10 --probes 8    # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

COMPRESSION = {"gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
               "lzf": {"compression": "lzf", "shuffle": True}, "none": None}
WARMUP = 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64, help="longest response (T); shortest is T/4")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--token-gram-probes", type=int, default=4)
    p.add_argument("--pairs", type=int, default=16, help="in-run pairs per step")
    p.add_argument("--appends", type=int, default=50)
    p.add_argument("--methods", default="gzip,lzf,none")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _record(step: int, lengths: np.ndarray, args, rng: np.random.Generator):
    from marginscope.trace import Record
    n, r = lengths.shape
    t, k = args.response_len, args.top_k
    pad = np.arange(t)[None, None, :] >= lengths[:, :, None]
    token_logp = np.where(pad, np.nan, -rng.exponential(size=(n, r, t)))
    prob = -np.sort(-rng.dirichlet(np.ones(64), size=(n, r, t))[..., :k], axis=-1).astype(np.float32)
    ids = rng.integers(0, 50257, (n, r, t, k), dtype=np.int32)
    grams = {i: (rng.normal(size=(lengths[i, 0], lengths[i, 1])), rng.random(lengths[i, 0]),
                 rng.random(lengths[i, 1])) for i in range(args.token_gram_probes)}
    return Record(step=step, logp=np.nansum(token_logp, -1), token_logp=token_logp,
                  gram=rng.normal(size=(n, r, r)), d_w=rng.random(n), d_l=rng.random(n),
                  case=rng.integers(1, 5, n).astype(np.int8), predicted_delta=rng.normal(size=(n, r)),
                  observed_delta=rng.normal(size=(n, r)), topk_ids=np.where(pad[..., None], -1, ids),
                  topk_prob=np.where(pad[..., None], np.nan, prob), token_gram=grams)


def _setup(args):
    from marginscope.dynamics.scoring import EncodedProbe
    from marginscope.probes import ProbeSet
    rng = np.random.default_rng(0)
    t = args.response_len
    lengths = rng.integers(t // 4, t + 1, (args.probes, 3))
    lengths[0, 0] = t
    probes = ProbeSet.from_records([{"id": f"p{i}", "prompt": "x", "chosen": "a", "rejected": "b",
                                     "extra": {"top": "c"}} for i in range(args.probes)])
    encoded = [EncodedProbe(f"p{i}", (1, 2, 3), tuple(tuple(range(m)) for m in row)) for i, row in enumerate(lengths)]
    records = [_record(step, lengths, args, rng) for step in range(WARMUP + args.appends)]
    pairs = [{name: rng.normal(size=args.pairs) for name in ("inner", "sq_w", "sq_l", "scale_w", "scale_l")}
             for _ in records]
    shapes = {i: (int(lengths[i, 0]), int(lengths[i, 1])) for i in range(args.token_gram_probes)}
    return probes, encoded, records, pairs, shapes, args.top_k


def _timed(method: str):
    def run(state):
        from marginscope.trace import TraceWriter, schema
        probes, encoded, records, pairs, shapes, top_k = state
        if COMPRESSION[method] is None:
            schema._COMPRESSED = set()
        else:
            schema._COMPRESSION = COMPRESSION[method]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "run.h5"
            rec_s, inrun_s = [], []
            with TraceWriter.create(path, probes=probes, encoded=encoded, names=["chosen", "rejected", "top"],
                                    metadata={"kind": "bench"}, ref_logp=None, top_k=top_k,
                                    token_gram_shapes=shapes) as w:
                header = path.stat().st_size
                for record, rows in zip(records, pairs):
                    start = time.perf_counter()
                    w.append_inrun(record.step, **rows, case=np.ones(len(rows["inner"]), np.int8))
                    middle = time.perf_counter()
                    w.append(record)
                    rec_s.append(time.perf_counter() - middle)
                    inrun_s.append(middle - start)
            size = path.stat().st_size
        rec_ms, inrun_ms = 1e3 * np.array(rec_s[WARMUP:]), 1e3 * np.array(inrun_s[WARMUP:])
        return {"record_mean": rec_ms.mean(), "record_p95": np.percentile(rec_ms, 95),
                "inrun_mean": inrun_ms.mean(), "inrun_p95": np.percentile(inrun_ms, 95),
                "kib_per_step": (size - header) / len(records) / 1024}
    return run


METHODS = {name: _timed(name) for name in COMPRESSION}


def main() -> None:
    args = _parser().parse_args()
    if args.worker:
        common.run_worker(lambda: _setup(args), METHODS, args.worker)
        return
    forwarded = [f"--probes={args.probes}", f"--response-len={args.response_len}", f"--top-k={args.top_k}",
                 f"--token-gram-probes={args.token_gram_probes}", f"--pairs={args.pairs}",
                 f"--appends={args.appends}"]
    results = {m: common.spawn(__file__, m, forwarded)["result"] for m in args.methods.split(",")}
    print(f"trace append · {args.probes} probes × 3 responses, T = {args.response_len}, top_k = {args.top_k}, "
          f"per-token Gram of {args.token_gram_probes} probes, {args.pairs} in-run pairs per step · "
          f"{args.appends} appends after {WARMUP} warm-up")
    print(f"machine: {common.machine()}")
    print(f"{'method':7} {'record ms mean':>15} {'p95':>7} {'in-run ms mean':>15} {'p95':>7} {'KiB/step':>9}")
    for name, r in results.items():
        print(f"{name:7} {r['record_mean']:15.2f} {r['record_p95']:7.2f} {r['inrun_mean']:15.2f} "
              f"{r['inrun_p95']:7.2f} {r['kib_per_step']:9.0f}")


if __name__ == "__main__":
    main()
