"""`marginscope.train.train` with `fsdp=True` under torchrun (gloo, CPU), for tests/test_train.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 sharded_train.py --out DIR

In one process group (every rank runs every run; rank 0 copies files between them):
  full      a sharded run of STEPS steps with checkpoints every 2 steps and the tracker;
  cut       full's checkpoint-2 and trace copied to a new out_dir, resumed sharded (resume="latest");
  ddp       the same copy resumed with DDP (fsdp=False): a sharded checkpoint read by an unsharded run;
  ddp-full  an unsharded (DDP) run like full;
  from-ddp  ddp-full's checkpoint-2 resumed sharded.
Each run leaves DIR/NAME/ (checkpoints), DIR/NAME.h5 (trace) and DIR/NAME.pt: {name: full tensor} of
the model's state_dict after the run (gathered with DTensor.full_tensor, independently of the
checkpoint code) and "history": the run's StepLogs as dicts.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from marginscope.demo.tiny import build_model, build_tokenizer
from marginscope.integrations.fsdp import full
from marginscope.probes import ProbeSet
from marginscope.train import TrainConfig, train

STEPS = 4
PAIRS = ProbeSet.from_records([
    {"id": f"t{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
    for i, (prompt, chosen, rejected) in enumerate([
        ("The movie was wonderful. The sentiment is", " positive.", " negative."),
        ("The service was terrible. The sentiment is", " negative.", " positive, and it was fine."),
        ("The food was", " great", " cold and bland"),
        ("This phone failed every expectation. The sentiment is", " negative.", " positive."),
        ("The concert was", " loud and joyful", " boring"),
        ("The hotel room was", " clean", " dirty and small"),
    ])
], source="pairs")


def model_and_tokenizer():
    """The initial policy (tiny GPT-2: tied embeddings, dropout 0.1, float32) and its tokenizer."""
    tokenizer = build_tokenizer()
    return build_model("gpt2", tokenizer, dtype=torch.float32, dropout=0.1), tokenizer


def config(out: Path, name: str, *, fsdp: bool, resume: str | Path | None = None) -> TrainConfig:
    """Run `name`'s settings: accumulation, warmup, clipping, weight decay, the tracker every 2 steps."""
    return TrainConfig(data=PAIRS, probes=PAIRS[:3], trace=out / f"{name}.h5", every=2, loss="dpo",
                       hparams={"beta": 0.5}, steps=STEPS, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1,
                       max_grad_norm=1.0, weight_decay=0.01, out_dir=out / name, checkpoint_every=2, fsdp=fsdp,
                       resume=resume)


def run(out: Path, name: str, *, fsdp: bool, resume_from: str | None = None) -> None:
    """Run `name`; with `resume_from`, first copy that run's checkpoint-2 and trace (rank 0)."""
    if resume_from is not None:
        if torch.distributed.get_rank() == 0:
            shutil.copytree(out / resume_from / "checkpoint-2", out / name / "checkpoint-2")
            shutil.copy(out / f"{resume_from}.h5", out / f"{name}.h5")
        torch.distributed.barrier()
    model, tokenizer = model_and_tokenizer()
    result = train(config(out, name, fsdp=fsdp, resume=None if resume_from is None else "latest"),
                   model=model, tokenizer=tokenizer)
    params = {k: full(v).detach().clone() for k, v in result.model.state_dict().items()}
    if result.rank == 0:
        torch.save({**params, "history": [asdict(h) for h in result.history]}, out / f"{name}.pt")
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.distributed.init_process_group("gloo")
    try:
        run(out, "full", fsdp=True)
        run(out, "cut", fsdp=True, resume_from="full")
        run(out, "ddp", fsdp=False, resume_from="full")
        run(out, "ddp-full", fsdp=False)
        run(out, "from-ddp", fsdp=True, resume_from="ddp-full")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
