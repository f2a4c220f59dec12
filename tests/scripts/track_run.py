"""A plain DPO loop with a Tracker, for the subprocess tests (SIGKILL, resume, torch.distributed).

Run directly (one process) or under `python -m torch.distributed.run --nproc_per_node=K` (gloo, DDP:
each rank trains on its share of the pairs; the tracker splits the probes and rank 0 writes).
Checkpoints (model + optimizer) are saved after every step to --ckpt-dir; --resume-from S restarts
from the one of step S and continues the same trace.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import marginscope as ms
from marginscope.demo.tiny import build_model, build_tokenizer
from marginscope.dynamics.inrun import score_pairs


PROBES = [
    {"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.", "rejected": " negative."},
    {"id": "b", "prompt": "Bad", "chosen": " no", "rejected": " yes it is fine"},
    {"id": "c", "prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive, and a good one."},
    {"id": "d", "prompt": "The food was", "chosen": " great", "rejected": " cold and bland"},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume-from", type=int, default=0)
    opts = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank, size = ms.integrations.distributed.world()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    probes = ms.probes.ProbeSet.from_records(PROBES)
    model = build_model("gpt2", tokenizer, dtype=torch.float64, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if opts.resume_from:
        state = torch.load(Path(opts.ckpt_dir) / f"step{opts.resume_from}.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    trained = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    encoded = ms.dynamics.encode(tokenizer, probes)
    share = len(encoded) // size
    mine = encoded[rank * share:(rank + 1) * share]
    loss = ms.losses.get("dpo", beta=0.5)
    with torch.no_grad():
        ref, _ = score_pairs(model.eval(), mine)
    n = len(mine)
    lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in mine], dtype=torch.float64)
    tracker = ms.Tracker(trained, tokenizer, probes, opts.out, loss=loss, every=opts.every, top_k=3,
                         batch_size=2, start_step=opts.resume_from, per_token="head", per_token_probes=["b"],
                         optimizer=opt)
    model.train()
    for step in range(opts.resume_from + 1, opts.steps + 1):
        with tracker.in_run(n_pairs=n, examples=mine) as geo:
            logps, _ = score_pairs(trained, mine)
            geo.watch(logps)
            loss(logps[:n], logps[n:], ref[:n], ref[n:], lengths[:, 0], lengths[:, 1]).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if opts.ckpt_dir and rank == 0:
            tmp = Path(opts.ckpt_dir) / f".step{step}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp)
            tmp.replace(Path(opts.ckpt_dir) / f"step{step}.pt")
        tracker.step(step)
        time.sleep(opts.sleep)
    tracker.close()
    if distributed:
        del trained
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
