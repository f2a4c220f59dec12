"""Plain DPO loops on tiny float64 models with a Tracker, one process or FSDP2-sharded, for tests/test_sharded.py.

    python sharded_run.py --out one/ llama llama+ac gpt2                    # one process
    python -m torch.distributed.run --nproc_per_node 2 sharded_run.py --out two/ llama llama+ac gpt2

Under torch.distributed every decoder block and the root are sharded with `fully_shard` (gloo, CPU);
each rank trains on its half of the pairs (FSDP's gradient mean equals one process's over all pairs).
The tracker records the 5 probes every step (3 chunks of 2: the ranks run different numbers of
forwards) with the optimizer's step split and in-run rows. Options after the model: +ac
(non-reentrant activation checkpointing), +mp (a mixed-precision policy: float32 compute for the
float64 master weights), +notracker, +fail (see `run`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import marginscope as ms
import marginscope.tracker
from marginscope.demo.tiny import build_model, build_tokenizer
from marginscope.dynamics.inrun import score_pairs
from marginscope.integrations.fsdp import full

PROBES = [
    {"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.", "rejected": " negative."},
    {"id": "b", "prompt": "Bad", "chosen": " no", "rejected": " yes it is fine"},
    {"id": "c", "prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive, and a good one."},
    {"id": "d", "prompt": "The food was", "chosen": " great", "rejected": " cold and bland"},
    {"id": "e", "prompt": "Service", "chosen": " quick and kind", "rejected": " slow"},
]


def shard(model, opts) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if opts.mp:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
    blocks = model.model.layers if opts.model == "llama" else model.transformer.h
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


class _Failing:
    """`measure` that raises from its `at`-th call on."""

    def __init__(self, at: int) -> None:
        self.calls, self.at, self.real = 0, at, marginscope.tracker.measure

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.at:
            raise RuntimeError("injected failure")
        return self.real(*args, **kwargs)


RUN_OPTIONS = ("ac", "mp", "notracker", "fail")


def run(name: str, out: Path, rank: int, size: int) -> None:
    """One training run, `name` = MODEL[+OPTION...] (OPTION in RUN_OPTIONS): trace out/NAME.h5, final
    parameters out/NAME.pt (rank 0). +fail: the geometry measurement raises on rank 1 from its second
    call on (on rank 0 in one process)."""
    model_name, *flags = name.split("+")
    opts = argparse.Namespace(model=model_name, fsdp=size > 1, **{f: f in flags for f in RUN_OPTIONS})
    real = marginscope.tracker.measure
    if opts.fail and rank == min(1, size - 1):
        marginscope.tracker.measure = _Failing(2)
    try:
        train(opts, out / f"{name}.h5", out / f"{name}.pt", rank, size)
    finally:
        marginscope.tracker.measure = real


def train(opts, trace: Path, params_out: Path, rank: int, size: int, steps: int = 3) -> None:
    tokenizer = build_tokenizer()
    probes = ms.probes.ProbeSet.from_records(PROBES)
    model = build_model(opts.model, tokenizer, dtype=torch.float64, seed=0)
    if opts.ac:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if opts.fsdp:
        shard(model, opts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pairs = ms.dynamics.encode(tokenizer, probes)[:4]
    share = len(pairs) // size
    mine = pairs[rank * share:(rank + 1) * share]
    loss = ms.losses.get("dpo", beta=0.5)
    with torch.no_grad():
        ref, _ = score_pairs(model.eval(), mine)
    n = len(mine)
    lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in mine], dtype=torch.float64)
    tracker = None if opts.notracker else ms.Tracker(
        model, tokenizer, probes, trace, loss=loss, every=1, top_k=3, batch_size=2,
        per_token="head", per_token_probes=["b"], optimizer=opt)
    model.train()
    for step in range(1, steps + 1):
        with tracker.in_run(n_pairs=n) if tracker is not None else _no_geometry() as geo:
            logps, _ = score_pairs(model, mine)
            geo.watch(logps)
            loss(logps[:n], logps[n:], ref[:n], ref[n:], lengths[:, 0], lengths[:, 1]).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.step(step)
    if tracker is not None:
        tracker.close()
    params = {name: full(p.detach()).clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(params, params_out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for NAME.h5 and NAME.pt")
    parser.add_argument("runs", nargs="+", help="MODEL[+OPTION...], MODEL llama or gpt2")
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank, size = ms.integrations.distributed.world()
    torch.set_num_threads(1)
    for name in args.runs:
        run(name, Path(args.out), rank, size)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class _no_geometry:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def watch(logps):
        return logps


if __name__ == "__main__":
    main()
