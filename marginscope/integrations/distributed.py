"""torch.distributed plumbing for the tracker: who am I, which probes are mine, gather to rank 0.

Probes are split across ranks by chunks of `batch_size` dealt round-robin, so each chunk is scored
in exactly the batch it would have in a one-process run (padding and batch shapes, hence the numbers,
do not depend on the world size). Results travel with `all_gather_object` (gloo and NCCL alike).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialized process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_chunks(n_items: int, batch_size: int, rank: int, size: int) -> list[list[int]]:
    """The chunks of item indices (consecutive, `batch_size` long) rank `rank` of `size` handles."""
    chunks = [list(range(s, min(s + batch_size, n_items))) for s in range(0, n_items, batch_size)]
    return chunks[rank::size]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] in one process."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, obj)
    return out if rank == 0 else None


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the parameters under DDP / DataParallel / accelerate / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def agree_failures(disabled: dict[str, str]) -> dict[str, str]:
    """The measurements some other rank has disabled and this one has not, {name: "rank k: reason"}
    (every rank calls it; {} in one process). Ranks disable a failed measurement together with it, so
    that no rank runs a measurement's collectives alone."""
    rank, size = world()
    if size == 1:
        return {}
    out: list[Any] = [None] * size
    torch.distributed.all_gather_object(out, dict(disabled))
    missing: dict[str, str] = {}
    for other, theirs in enumerate(out):
        for name, reason in theirs.items():
            if name not in disabled and name not in missing:
                missing[name] = f"rank {other}: {reason}"
    return missing
