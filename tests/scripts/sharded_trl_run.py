"""TRL `InRunDPOTrainer` runs with the tracker attached, one process or sharded by accelerate's FSDP2
plugin, on tiny float64 models, for tests/test_sharded_trl.py.

    python sharded_trl_run.py --out one/ llama gpt2                                  # one process
    python -m torch.distributed.run --nproc_per_node 2 sharded_trl_run.py --out two/ llama gpt2

Under torch.distributed the DPOConfig asks for FSDP2 (`fsdp=True, fsdp_config={"version": 2}`): the
Trainer builds accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)` and `accelerator.prepare`
shards the policy with `fully_shard` (decoder blocks, embedding, [final norm, head], root); TRL shards
the reference with `fully_shard` at its root. The global batch is 4 pairs in dataset order
(sequential sampling): one process trains on all 4, rank r of 2 on pairs 2r, 2r+1 of each step.

accelerate (1.x) puts itself into FSDP mode only on accelerators: its `AcceleratorState` sets
`DistributedType.FSDP` in the multi-accelerator branch only, and a multi-process CPU run with an FSDP
plugin silently trains with DDP. `cpu_fsdp_shim()` is a test-only patch that makes the CPU run take
that branch; everything after it (`fsdp2_prepare_model`, TRL's `prepare_fsdp`, FSDP2's collectives
over gloo) is unpatched.

Options after the model: +notracker (no callback), +fail (the in-run geometry raises on rank 1 at its
second micro-batch; on rank 0 in one process). Writes out/NAME.h5 (trace), out/NAME.pt (final full
parameters, rank 0) and out/NAME.json (whether the policy was sharded, rank 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch


def cpu_fsdp_shim() -> None:
    """Test-only: let accelerate's `AcceleratorState` enter FSDP mode in a multi-process CPU run (see the
    module doc). After its own `__init__`, a state it left at MULTI_CPU although it was given an FSDP
    plugin gets what its multi-accelerator branch does (accelerate/state.py, AcceleratorState.__init__):
    the plugin (with the mixed precision), `DistributedType.FSDP`, and that type copied into
    PartialState's shared state, which every later `AcceleratorState()` reads back."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


PROBES = [
    {"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.", "rejected": " negative."},
    {"id": "b", "prompt": "Bad", "chosen": " no", "rejected": " yes it is fine"},
    {"id": "c", "prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive, and a good one."},
    {"id": "d", "prompt": "The food was", "chosen": " great", "rejected": " cold and bland"},
    {"id": "e", "prompt": "Service", "chosen": " quick and kind", "rejected": " slow"},
]
PAIRS = [
    {"prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.", "rejected": " negative, and bad."},
    {"prompt": "Bad", "chosen": " no", "rejected": " yes it is fine"},
    {"prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive."},
    {"prompt": "Good food", "chosen": " yes, great", "rejected": " no"},
    {"prompt": "The service was slow", "chosen": " and rude.", "rejected": " but kind and quick and fine."},
    {"prompt": "I loved it", "chosen": " a lot", "rejected": " not"},
]
GLOBAL_BATCH, STEPS = 4, 3
RUN_OPTIONS = ("notracker", "fail")


class _FailingWatch:
    """`InRunGeometry.watch_tokens` that raises at its `at`-th call."""

    def __init__(self, at: int) -> None:
        from marginscope.dynamics.inrun import InRunGeometry

        self.calls, self.at, self.real = 0, at, InRunGeometry.watch_tokens

    def __get__(self, geo, owner):
        return lambda *args, **kwargs: self(geo, *args, **kwargs)

    def __call__(self, geo, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected failure")
        return self.real(geo, *args, **kwargs)


def run(name: str, out: Path, rank: int, size: int) -> None:
    """One training run, `name` = MODEL[+OPTION...] (MODEL llama or gpt2, OPTION in RUN_OPTIONS)."""
    import datasets
    import trl
    from torch.distributed.tensor import DTensor

    import marginscope as ms
    from marginscope.demo.tiny import build_model, build_tokenizer
    from marginscope.dynamics.inrun import InRunGeometry
    from marginscope.integrations.fsdp import full, is_sharded

    model_name, *flags = name.split("+")
    opts = {f: f in flags for f in RUN_OPTIONS}
    tokenizer = build_tokenizer()
    model = build_model(model_name, tokenizer, dtype=torch.float64, seed=0)
    sharding = dict(fsdp=True, fsdp_config={"version": 2}) if size > 1 else {}
    args = trl.DPOConfig(output_dir=str(out / f"{name}.out"), per_device_train_batch_size=GLOBAL_BATCH // size,
                         max_steps=STEPS, learning_rate=0.5, optim="sgd", pad_to_multiple_of=64, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, seed=0, disable_tqdm=True, bf16=False, train_sampling_strategy="sequential",
                         **sharding)
    trainer = ms.integrations.InRunDPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS * 2), processing_class=tokenizer)
    if not opts["notracker"]:
        ms.integrations.attach(trainer, ms.integrations.TRLCallback(
            probes=ms.probes.ProbeSet.from_records(PROBES), path=out / f"{name}.h5", every=1, top_k=3,
            batch_size=2, per_token="head", per_token_probes=["b"]))
    real = InRunGeometry.watch_tokens
    if opts["fail"] and rank == min(1, size - 1):
        InRunGeometry.watch_tokens = _FailingWatch(2)
    try:
        trainer.train()
    finally:
        InRunGeometry.watch_tokens = real
    params = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    facts = {"distributed_type": str(trainer.accelerator.distributed_type),
             "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
             "dtensor_params": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
             "ref_sharded": is_sharded(trainer.ref_model), "inrun_disabled": trainer._inrun_disabled}
    facts = ms.integrations.distributed.gather_to_main(facts)
    if rank == 0:
        torch.save(params, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps(facts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for NAME.h5, NAME.pt and NAME.json")
    parser.add_argument("runs", nargs="+", help="MODEL[+OPTION...]")
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        cpu_fsdp_shim()
    torch.set_num_threads(1)
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # no process group yet
    for name in args.runs:
        run(name, Path(args.out), rank, size)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
