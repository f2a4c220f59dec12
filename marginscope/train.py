"""A small, honest preference trainer for probe experiments, with the tracker attached.

    from marginscope.train import TrainConfig, train
    result = train(TrainConfig(model="./sft", data="prefs.jsonl", loss="dpo", hparams={"beta": 0.1},
                               probes="probes.jsonl", trace="run.h5", every=5, steps=20, lr=1e-5))
    result.history[-1].loss, result.trace

Plain PyTorch on one device (or DDP when launched by torchrun / accelerate launch): AdamW, any
per-pair loss of `marginscope.losses`, a frozen reference (the initial policy, or `ref`) whose
log-probs are computed once per training pair (eval mode, no gradients) before the first step,
gradient accumulation, a linear or constant schedule with warmup, optional gradient-norm clipping,
checkpoints that resume bit for bit. docs/training.md is the guide.

One optimizer step takes the next `batch_size × grad_accum` pairs of the data order — a fresh seeded
permutation of the pairs per epoch, epochs concatenated, so an epoch boundary may fall inside a step
and no pair is ever dropped — and scores them in micro-batches of `batch_size`. The step's loss is the
mean of its per-pair losses: each micro-batch back-propagates Σᵢ ℓᵢ / n_step (n_step = the pairs of the
whole step), so A micro-batches of B pairs give the gradient of one batch of A·B pairs up to float
rounding (a loss coupled across its batch, like alpha-dpo's z-score, sees each micro-batch alone).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import losses as loss_zoo
from .checkpoint import check_output_path
from .compatibility import check_compatible, resolve_device
from .conventions import check_convention, encode_probes
from .dynamics.inrun import score_pairs
from .dynamics.measure import check_options
from .dynamics.scoring import EncodedProbe, model_max_length, sequence_logp
from .errors import MarginscopeError
from .integrations.distributed import gather_to_main, world
from .integrations.fsdp import full_checkpoint, load_full_optimizer_state, no_gradient_sync, shard_model
from .loading import DTYPES, load_model, load_tokenizer
from .probes import ProbeSet
from .probes import load as load_probes
from .progress import progress_bar
from .tracker import Tracker

SCHEDULES = ("linear", "constant")
STATE_FILE = "trainer_state.pt"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# TrainConfig fields a resumed run must share with the checkpoint (else its steps would differ).
_RUN_FIELDS = ("loss", "hparams", "batch_size", "grad_accum", "lr", "weight_decay", "schedule",
               "warmup_steps", "max_grad_norm", "seed", "convention", "max_length", "truncation_mode", "add_eos")


@dataclass
class TrainConfig:
    """Everything that shapes a run. Paths may be strings; `data` and `probes` may be `ProbeSet`s.

    data: preference pairs in the probe format (id, prompt, chosen, rejected; "extra" is ignored).
    model: a model directory (save_pretrained layout, with its tokenizer) or a GGUF file; optional when `train()`
    gets an in-memory model. ref: a reference model directory (default: the initial policy).
    probes + trace: attach `ms.Tracker` (both or neither); every, per_token, per_token_probes (ids; default
    all probes), top_k as in the tracker;
    in_run: record the exact geometry of every training pair. steps and/or epochs: the run length
    (the first reached ends it; neither = one epoch). schedule: "linear" (warmup then linear decay to
    0 at the last step) or "constant" (after warmup). max_grad_norm: clip the gradient norm (None = off).
    checkpoint_every: save `out_dir/checkpoint-<step>` every k steps (the last step is always saved
    when out_dir is set). resume: "latest" (the newest checkpoint in out_dir) or a checkpoint folder.
    overwrite: replace an existing trace and the checkpoints of an earlier run in out_dir.
    device, dtype: for models loaded from directories (dtype "auto" keeps the saved dtype; device "auto":
    cuda when available, else cpu). convention, max_length, truncation_mode, add_eos: how pairs and
    probes become token ids (`marginscope.conventions`; default "trl", as TRL 1.x's DPOTrainer).
    fsdp: shard the model with FSDP2 (`fully_shard` on each decoder block and the root) instead of DDP;
    needs torchrun with 2 or more processes. Its checkpoints hold the full (unsharded) model and optimizer
    state in the same layout as unsharded runs, so a sharded run resumes from an unsharded (DDP)
    checkpoint of the same number of processes and vice versa.
    """

    data: str | Path | ProbeSet
    model: str | Path | None = None
    loss: str = "dpo"
    hparams: dict[str, float] = field(default_factory=dict)
    ref: str | Path | None = None
    probes: str | Path | ProbeSet | None = None
    trace: str | Path | None = None
    every: int = 10
    per_token: str | None = None
    per_token_probes: list[str] | None = None
    top_k: int = 5
    in_run: bool = True
    out_dir: str | Path | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    seed: int = 0
    checkpoint_every: int | None = None
    resume: str | Path | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    convention: str = "trl"
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    add_eos: bool = False
    fsdp: bool = False
    progress: bool = False

    def validate(self) -> None:
        """Raise `MarginscopeError` naming the first bad value (nothing is loaded or written)."""
        for name in ("batch_size", "grad_accum", "every", "top_k"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        _check_positive("lr", self.lr)
        if self.epochs is not None:
            _check_positive("epochs", self.epochs)
        if self.max_grad_norm is not None:
            _check_positive("max_grad_norm", self.max_grad_norm)
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise MarginscopeError(f"weight_decay must be ≥ 0; got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise MarginscopeError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.dtype not in DTYPES:
            raise MarginscopeError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        check_options(engine="auto", per_token=self.per_token, batch_size=self.batch_size, padding_side="right")
        check_convention(self.convention, max_length=self.max_length, truncation_mode=self.truncation_mode,
                         add_eos=self.add_eos)
        if (self.probes is None) != (self.trace is None):
            raise MarginscopeError("probes and trace go together: give both to track the run, or neither")
        if self.per_token is not None and self.probes is None:
            raise MarginscopeError("per_token needs probes (and a trace): it is a per-probe measurement")
        if self.out_dir is None and (self.checkpoint_every is not None or self.resume == "latest"):
            what = "checkpoint_every" if self.checkpoint_every is not None else "resume='latest'"
            raise MarginscopeError(f"{what} needs out_dir, the folder that holds the checkpoints")
        loss = loss_zoo.get(self.loss, **self.hparams)
        if self.ref is not None and not loss.uses_reference:
            raise MarginscopeError(f"loss '{self.loss}' uses no reference model; drop ref")

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view (paths as strings, in-memory probe sets by their source)."""
        def show(value: Any) -> Any:
            if isinstance(value, ProbeSet):
                return f"<ProbeSet {value.source}: {len(value)} pairs>"
            return str(value) if isinstance(value, Path) else value
        return {f.name: show(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class StepLog:
    """One optimizer step: its pairs, mean loss, mean log-ratio margin (r_w − r_l, with r = log π −
    log π_ref; log π_w − log π_l for reference-free losses), the fraction of pairs with a positive
    margin, the learning rate it used, the gradient norm before clipping, and the epochs done after it."""

    step: int
    pairs: int
    loss: float
    margin: float
    accuracy: float
    lr: float
    grad_norm: float
    epoch: float


@dataclass
class TrainResult:
    """What `train` returns: the trained model (in memory), per-step logs (including those before a
    resume), the trace and the last checkpoint written."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    history: list[StepLog]
    trace: Path | None
    checkpoint: Path | None
    seconds: float
    rank: int = 0  # this process's rank under torch.distributed

    @property
    def steps(self) -> int:
        return self.history[-1].step if self.history else 0

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss if self.history else math.nan


class DataOrder:
    """Which pairs each optimizer step sees: epoch e is the e-th permutation drawn from a
    `torch.Generator` seeded with `seed`; epochs are concatenated and cut into steps of
    `batch_size × grad_accum × world_size` pairs until `total_pairs`, so a pair is never dropped and
    the order is a pure function of the seed. A step's pairs go in rounds of `batch_size × world_size`,
    process k taking the k-th `batch_size` of each round. In-run trace rows (step s, rank k, pair j)
    are training pair `order.shard(s, k)[j]`."""

    def __init__(self, n_pairs: int, batch_size: int, total_pairs: int, seed: int, *, grad_accum: int = 1,
                 world_size: int = 1) -> None:
        self.n_pairs, self.batch_size, self.total_pairs, self.seed = n_pairs, batch_size, total_pairs, seed
        self.world_size = world_size
        self.per_step = batch_size * grad_accum * world_size
        self._generator = torch.Generator().manual_seed(seed)
        self._epochs: list[list[int]] = []

    @classmethod
    def of(cls, config: TrainConfig, n_pairs: int, world_size: int = 1) -> DataOrder:
        """The order of `config`: its steps and/or epochs (one epoch when neither is set)."""
        per_step = config.batch_size * config.grad_accum * world_size
        epochs = 1 if config.epochs is None and config.steps is None else config.epochs
        total = math.ceil(epochs * n_pairs - 1e-9) if epochs is not None else math.inf
        if config.steps is not None:
            total = min(total, config.steps * per_step)
        return cls(n_pairs, config.batch_size, int(total), config.seed, grad_accum=config.grad_accum,
                   world_size=world_size)

    @property
    def steps(self) -> int:
        return math.ceil(self.total_pairs / self.per_step)

    def pairs(self, step: int) -> list[int]:
        """Indices of the training pairs of optimizer step `step` (1-based), all processes together."""
        start = (step - 1) * self.per_step
        return [self._at(pos) for pos in range(start, min(start + self.per_step, self.total_pairs))]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """Process `rank`'s micro-batches of `step`, one per round (empty where a short last step runs out)."""
        pairs, width = self.pairs(step), self.batch_size * self.world_size
        offset = rank * self.batch_size
        return [pairs[start + offset:start + offset + self.batch_size] for start in range(0, len(pairs), width)]

    def shard(self, step: int, rank: int = 0) -> list[int]:
        """Process `rank`'s pairs of `step`, in the order of its in-run trace rows."""
        return [i for batch in self.micro_batches(step, rank) for i in batch]

    def _at(self, position: int) -> int:
        epoch, index = divmod(position, self.n_pairs)
        while len(self._epochs) <= epoch:
            self._epochs.append(torch.randperm(self.n_pairs, generator=self._generator).tolist())
        return self._epochs[epoch][index]


def train(config: TrainConfig, *, model: PreTrainedModel | None = None,
          tokenizer: PreTrainedTokenizerBase | None = None, ref_model: PreTrainedModel | None = None,
          callback: Callable[[StepLog], None] | None = None) -> TrainResult:
    """Run `config`. `model`/`tokenizer`/`ref_model`: in-memory alternatives to `config.model` and
    `config.ref` (the model is trained in place and keeps its dtype and device). `callback` gets each
    step's `StepLog` after the step (and its checkpoint) is done.

    Every user mistake (bad values, unreadable files, pairs or probes longer than the model's context,
    an existing trace or earlier checkpoints without resume/overwrite, a checkpoint made with other
    settings) raises `MarginscopeError` before anything is written. A non-finite loss stops the run
    with `MarginscopeError` before its optimizer step. Launched by torchrun / accelerate launch
    (WORLD_SIZE > 1), every process runs this; see `_Loop` for how the pairs are shared.
    """
    started = time.perf_counter()
    config.validate()
    config = replace(config, device=resolve_device(config.device))
    with _process_group(config.device) as (rank, world_size):
        config = replace(config, device=_rank_device(config.device, world_size))
        if config.fsdp and world_size < 2:
            raise MarginscopeError("fsdp: launch with torchrun --nproc_per_node N, N ≥ 2 (one process has nothing to shard)")
        setup = _Setup.of(config, model, tokenizer, ref_model, world_size)
        if config.fsdp:
            shard_model(setup.model)
        _barrier()  # every process has checked its inputs before anything is written
        loop = setup.loop(config, rank)
        was_training = setup.model.training
        try:
            with _tracker(config, setup, loop.start, loop.optimizer) as tracker:
                setup.ref_model = None
                _set_rng(setup.state["rng"][rank] if setup.state is not None else None, config.seed)
                setup.model.train()
                loop.run(tracker, callback if rank == 0 else None)
        finally:
            setup.model.train(was_training)
    return TrainResult(setup.model, setup.tokenizer, loop.history,
                       None if setup.probes is None else Path(config.trace),
                       loop.last_checkpoint, time.perf_counter() - started, rank)


@dataclass
class _Setup:
    """A run's inputs, loaded and checked: everything that can be a user mistake, before any write."""

    loss_fn: loss_zoo.PairLoss
    probes: ProbeSet | None
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    ref_model: PreTrainedModel | None  # None: the initial policy (or resuming: the checkpoint has the log-probs)
    encoded: list[EncodedProbe]
    order: DataOrder
    run: dict[str, Any]
    state: dict[str, Any] | None  # the checkpoint's trainer state when resuming

    @classmethod
    def of(cls, config: TrainConfig, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None,
           ref_model: PreTrainedModel | None, world_size: int) -> _Setup:
        loss_fn = loss_zoo.get(config.loss, **config.hparams)
        data = _training_pairs(config.data)
        probes = _probe_set(config.probes)
        checkpoint = _checkpoint_to_resume(config)
        state = _load_state(checkpoint) if checkpoint is not None else None
        _check_outputs(config, resuming=state is not None)
        model, tokenizer = _models(config, model, tokenizer, checkpoint)
        max_length = model_max_length(model)
        encoded = _encode(tokenizer, data, config, max_length)
        if probes is not None:
            _encode(tokenizer, probes, config, max_length)
        order = DataOrder.of(config, len(data), world_size)
        run = _run_signature(config, data, order, model, world_size)
        if state is not None:
            _check_same_run(checkpoint, state["run"], run)
        if not any(p.requires_grad for p in model.parameters()):
            raise MarginscopeError("the model has no trainable parameter (requires_grad is False everywhere)")
        ref_model = _reference_model(config, ref_model, model) if state is None else None
        check_compatible(model, tokenizer, ref_model, encoded=encoded)
        return cls(loss_fn, probes, model, tokenizer, ref_model, encoded, order, run, state)

    def loop(self, config: TrainConfig, rank: int) -> _Loop:
        """Reference log-probs, optimizer and schedule (restored when resuming), out_dir: the loop to run."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer, scheduler = _optimizer(config, params, self.order.steps)
        if self.state is None:
            ref = self.model if self.ref_model is None else self.ref_model
            ref_logp = _reference_logp(self.loss_fn, ref, self.encoded, config.batch_size, pad_id)
            start, history = 0, []
        else:
            if config.fsdp:
                load_full_optimizer_state(self.model, optimizer, self.state["optimizer"])
            else:
                optimizer.load_state_dict(self.state["optimizer"])
            scheduler.load_state_dict(self.state["scheduler"])
            ref_logp, start = self.state["ref_logp"], self.state["step"]
            history = [StepLog(**h) for h in self.state["history"]]
        out_dir = _prepare_out_dir(config, resuming=self.state is not None, main=rank == 0)
        return _Loop(config, self, ref_logp, optimizer, scheduler, pad_id, out_dir, start, history)


# --- inputs ------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MarginscopeError(f"{name} must be an integer ≥ {minimum}; got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise MarginscopeError(f"{name} must be a number > 0; got {value!r}")


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple[int, int]]:
    """(rank, world size). Under torchrun / accelerate launch (WORLD_SIZE > 1) without a process group,
    one is started (NCCL for CUDA, else gloo) and torn down afterwards."""
    dist = torch.distributed
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    try:
        yield world()
    finally:
        if started:
            gc.collect()  # DDP objects caught in reference cycles must not outlive the group (their teardown hangs)
            dist.destroy_process_group()


def _rank_device(device: str, world_size: int) -> str:
    """`cuda` means this process's GPU (LOCAL_RANK) when several processes train."""
    if world_size > 1 and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _training_pairs(data: str | Path | ProbeSet) -> ProbeSet:
    """The pairs to train on, validated like a probe file; extra responses are dropped."""
    pairs = data if isinstance(data, ProbeSet) else load_probes(data)
    return ProbeSet([replace(p, extra={}) for p in pairs], pairs.source)


def _probe_set(probes: str | Path | ProbeSet | None) -> ProbeSet | None:
    return probes if probes is None or isinstance(probes, ProbeSet) else load_probes(probes)


def _encode(tokenizer: PreTrainedTokenizerBase, pairs: ProbeSet, config: TrainConfig,
            context_length: int | None) -> list[EncodedProbe]:
    """Token ids of every pair under the run's convention; a pair longer than the model's context (or
    truncated to nothing) is an error naming file and id."""
    try:
        return encode_probes(tokenizer, pairs, convention=config.convention, max_length=config.max_length,
                             truncation_mode=config.truncation_mode, add_eos=config.add_eos,
                             context_length=context_length)
    except MarginscopeError as err:
        raise MarginscopeError(f"{pairs.source}: {err}") from None


def _models(config: TrainConfig, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None,
            checkpoint: Path | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy and tokenizer: in memory or from `config.model`; weights from `checkpoint` when resuming."""
    source = checkpoint if checkpoint is not None else config.model
    if tokenizer is None:
        if source is None:
            raise MarginscopeError("no tokenizer: set TrainConfig.model to a model directory or pass tokenizer=")
        tokenizer = load_tokenizer(source)
    if model is None:
        if source is None:
            raise MarginscopeError("no model: set TrainConfig.model to a model directory or pass model=")
        return load_model(source, dtype="auto" if checkpoint is not None else config.dtype, device=config.device), tokenizer
    if checkpoint is not None:
        saved = load_model(checkpoint, dtype="auto", device="cpu")
        with torch.no_grad():
            model.load_state_dict(saved.state_dict())
    return model, tokenizer


def _reference_model(config: TrainConfig, ref_model: PreTrainedModel | None,
                     model: PreTrainedModel) -> PreTrainedModel | None:
    """The reference given in memory or by `config.ref`; None means the initial policy."""
    if ref_model is not None or config.ref is None:
        return ref_model
    return load_model(config.ref, dtype=config.dtype, device=str(next(model.parameters()).device))


def _reference_logp(loss_fn: loss_zoo.PairLoss, ref: PreTrainedModel, encoded: list[EncodedProbe],
                    batch_size: int, pad_id: int) -> Tensor:
    """float64 [N, 2] (chosen, rejected) reference log-probs, once per pair; zeros for reference-free losses."""
    if not loss_fn.uses_reference:
        return torch.zeros(len(encoded), 2, dtype=torch.float64)
    return sequence_logp(ref, encoded, batch_size=batch_size, pad_id=pad_id)


# --- outputs, checkpoints and resume ----------------------------------------------------------------


def _checkpoints(out_dir: Path) -> dict[int, Path]:
    """Complete checkpoints in `out_dir` by step."""
    if not out_dir.is_dir():
        return {}
    found = {}
    for path in out_dir.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found[int(match.group(1))] = path
    return found


def _checkpoint_to_resume(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = _checkpoints(Path(config.out_dir))
        if not found:
            raise MarginscopeError(f"{config.out_dir}: no checkpoint-<step> folder to resume from")
        return found[max(found)]
    path = Path(config.resume)
    if not (path / STATE_FILE).is_file():
        raise MarginscopeError(f"{path}: not a marginscope checkpoint (no {STATE_FILE})")
    return path


def _load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any unreadable file is the same user-facing problem
        raise MarginscopeError(f"{checkpoint / STATE_FILE}: cannot read it: {str(err).splitlines()[0]}") from None


def _check_outputs(config: TrainConfig, *, resuming: bool) -> None:
    """Refuse to overwrite an earlier run's trace or checkpoints unless resuming or overwriting."""
    if config.trace is not None:
        trace = check_output_path(config.trace)
        if trace.exists() and not (resuming or config.overwrite):
            raise MarginscopeError(f"{trace}: exists; resume its run (--resume) or replace it (--overwrite)")
        if resuming and not trace.exists():
            raise MarginscopeError(f"{trace}: does not exist; a resumed run continues its trace (the "
                                   "probes' reference log-probs are in its first record)")
    if config.out_dir is not None:
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise MarginscopeError(f"{out_dir}: exists and is not a folder")
        if not out_dir.parent.is_dir():
            raise MarginscopeError(f"{out_dir}: folder {out_dir.parent} does not exist")
        if _checkpoints(out_dir) and not (resuming or config.overwrite):
            raise MarginscopeError(f"{out_dir}: holds checkpoints of an earlier run; resume it (--resume), "
                                   "replace them (--overwrite) or choose another out_dir")


def _prepare_out_dir(config: TrainConfig, *, resuming: bool, main: bool) -> Path | None:
    """Create out_dir; with overwrite (and no resume), remove the earlier run's checkpoints (the main
    process does it, the others wait)."""
    if config.out_dir is None:
        return None
    out_dir = Path(config.out_dir)
    if main:
        out_dir.mkdir(exist_ok=True)
        if config.overwrite and not resuming:
            for path in _checkpoints(out_dir).values():
                shutil.rmtree(path)
    _barrier()
    return out_dir


def _run_signature(config: TrainConfig, data: ProbeSet, order: DataOrder, model: PreTrainedModel,
                   world_size: int) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint."""
    # the number of processes first: it changes the run length in pairs too, and is the one to name
    return {"world_size": world_size, **{name: getattr(config, name) for name in _RUN_FIELDS},
            "data": data.fingerprint(), "total_pairs": order.total_pairs,
            "dtype": str(next(model.parameters()).dtype)}


def _check_same_run(checkpoint: Path, saved: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse a checkpoint whose run differs from this one in anything that shapes its steps."""
    labels = {"data": "training pairs (fingerprint)", "total_pairs": "run length in pairs (steps/epochs)",
              "dtype": "model dtype", "world_size": "number of processes"}
    for key, value in run.items():
        if saved.get(key) != value:
            label = labels.get(key, key)
            shown = (f"other {label}" if key == "data" else
                     f"{label} {saved.get(key)!r}, this run has {value!r}")
            raise MarginscopeError(f"{checkpoint}: made with {shown}; resume with the run's own settings")


def _save_checkpoint(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     state: dict[str, Any], model_state: dict[str, Tensor] | None = None) -> Path:
    """Write `path` (model + tokenizer via save_pretrained, `state` as trainer_state.pt) atomically:
    a hidden temp folder renamed into place, so an interrupted save never looks like a checkpoint.
    `model_state`: the weights to save instead of the model's own (the full ones of a sharded model)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


# --- the loop --------------------------------------------------------------------------------------------


def _optimizer(config: TrainConfig, params: list[nn.Parameter],
               total_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and the schedule: warmup w steps linearly from 0, then constant or linear decay to 0 at the
    last step (the formulas of transformers' get_linear/constant_schedule_with_warmup)."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup, linear = config.warmup_steps, config.schedule == "linear"

    def factor(done: int) -> float:
        if done < warmup:
            return done / warmup
        return max(0.0, (total_steps - done) / max(1, total_steps - warmup)) if linear else 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _tracker(config: TrainConfig, setup: _Setup, start: int,
             optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager[Tracker | None]:
    """The tracker of `config` (a resumed run continues its trace from `start`; the step before each
    record split by `optimizer`), or a null context."""
    if setup.probes is None:
        return contextlib.nullcontext()
    return Tracker(setup.model, setup.tokenizer, setup.probes, config.trace, loss=setup.loss_fn, every=config.every,
                   per_token=config.per_token, per_token_probes=config.per_token_probes, top_k=config.top_k, ref_model=setup.ref_model,
                   convention=config.convention, max_length=config.max_length,
                   truncation_mode=config.truncation_mode, add_eos=config.add_eos,
                   start_step=start, overwrite=config.overwrite, metadata={"kind": "train", "train": config.describe()},
                   optimizer=optimizer)


def _set_rng(saved: dict[str, Any] | None, seed: int) -> None:
    """A fresh run seeds torch (dropout); a resumed one restores the checkpoint's RNG streams."""
    if saved is None:
        torch.manual_seed(seed)
        return
    torch.random.set_rng_state(saved["cpu"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"cpu": torch.random.get_rng_state(), "cuda": cuda}


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The total gradient norm, clipping to `max_norm` when set."""
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [torch.linalg.vector_norm(p.grad.detach().to(torch.float64)) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class _Loop:
    """The optimizer steps of one `train` call.

    Under torch.distributed the model is wrapped in DistributedDataParallel (or sharded with FSDP2, whose
    reduce-scatter averages the gradient the same way, with `fsdp`) and each process scores
    its share of every round of micro-batches (`DataOrder.micro_batches`); each back-propagates
    world_size · Σᵢ ℓᵢ / n_step, which DDP's gradient average turns into the mean over the step's pairs.
    A process whose share of a short last round is empty back-propagates one pair with weight 0, so
    the gradient all-reduce still meets every process. Logged losses and margins are gathered from all
    processes; the main process writes checkpoints (with every process's RNG state; under FSDP2 the full
    model and optimizer state, which every process helps gather).
    """

    def __init__(self, config: TrainConfig, setup: _Setup, ref_logp: Tensor, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, pad_id: int, out_dir: Path | None, start: int,
                 history: list[StepLog]) -> None:
        self.config, self.model, self.tokenizer, self.encoded = config, setup.model, setup.tokenizer, setup.encoded
        self.loss_fn, self.order, self.run_signature = setup.loss_fn, setup.order, setup.run
        self.optimizer, self.scheduler, self.pad_id, self.out_dir = optimizer, scheduler, pad_id, out_dir
        self.start, self.history = start, history
        self.rank, self.world_size = world()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        device = self.params[0].device
        self.forward = self.model if self.world_size == 1 or config.fsdp else nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.ref_logp = ref_logp.to(device=device, dtype=torch.float64)
        self.lengths = torch.tensor([[len(ids) for ids in e.response_ids] for e in self.encoded],
                                    dtype=torch.float64, device=device)
        self.last_checkpoint: Path | None = None

    def run(self, tracker: Tracker | None, callback: Callable[[StepLog], None] | None) -> None:
        try:
            with progress_bar(self.config.progress and self.rank == 0, "training", self.order.steps,
                              completed=self.start, with_loss=True) as advance:
                for step in range(self.start + 1, self.order.steps + 1):
                    log = self.step(step, tracker)
                    self.history.append(log)
                    if tracker is not None:
                        tracker.step(step)
                    if self._checkpoint_due(step):
                        self.last_checkpoint = self.save(step)
                    advance(log.loss)
                    if callback is not None:
                        callback(log)
        finally:
            self.forward = self.model  # the DDP wrapper goes while its process group lives
        if self.last_checkpoint is None and self.out_dir is not None:
            self.last_checkpoint = _checkpoints(self.out_dir).get(self.order.steps)

    def step(self, step: int, tracker: Tracker | None) -> StepLog:
        """One optimizer step over the step's pairs, in micro-batches of batch_size."""
        n_step = len(self.order.pairs(step))
        rounds = self.order.micro_batches(step, self.rank)
        losses, margins = [], []
        for r, pairs in enumerate(rounds):
            sync = r == len(rounds) - 1 or self.world_size == 1
            with contextlib.nullcontext() if sync else (
                    no_gradient_sync(self.model) if self.config.fsdp else self.forward.no_sync()):
                loss, margin = self.micro_batch(pairs, n_step, tracker)
            losses.append(loss)
            margins.append(margin)
        loss, margin = _gathered(torch.cat(losses)), _gathered(torch.cat(margins))
        if not torch.isfinite(loss).all():
            raise MarginscopeError(f"step {step}: the loss is not finite ({float(loss.mean())}); the step was "
                                   "not applied — lower lr or check the data and the loss")
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = _grad_norm(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepLog(step=step, pairs=n_step, loss=float(loss.mean()), margin=float(margin.mean()),
                       accuracy=float((margin > 0).double().mean()), lr=lr, grad_norm=grad_norm,
                       epoch=min(step * self.order.per_step, self.order.total_pairs) / self.order.n_pairs)

    def micro_batch(self, pairs: list[int], n_step: int, tracker: Tracker | None) -> tuple[Tensor, Tensor]:
        """Forward and backward of world_size · Σ ℓ_i / n_step over `pairs`; returns the per-pair losses and
        margins. An empty `pairs` back-propagates a pair with weight 0 (see the class doc)."""
        batch_pairs = pairs or self.order.pairs(1)[:1]
        n = len(batch_pairs)
        batch = [self.encoded[i] for i in batch_pairs]
        ref, lengths = self.ref_logp[batch_pairs], self.lengths[batch_pairs]
        watching = tracker is not None and self.config.in_run and bool(pairs)
        with tracker.in_run(n_pairs=n, examples=batch) if watching else contextlib.nullcontext() as geo:
            logps, _ = score_pairs(self.forward, batch, pad_id=self.pad_id)
            if geo is not None:
                geo.watch(logps)
            logps = logps.to(torch.float64)
            losses = self.loss_fn(logps[:n], logps[n:], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1])
            if losses.shape != (n,):
                raise MarginscopeError(f"loss '{self.loss_fn.name}' returned shape {tuple(losses.shape)} for "
                                       f"{n} pairs; a per-pair loss returns one value per pair")
            (losses.sum() * (self.world_size if pairs else 0) / n_step).backward()
        margin = (logps[:n] - ref[:, 0]) - (logps[n:] - ref[:, 1])
        keep = slice(None) if pairs else slice(0)
        return losses.detach().cpu()[keep], margin.detach().cpu()[keep]

    def _checkpoint_due(self, step: int) -> bool:
        if self.out_dir is None:
            return False
        every = self.config.checkpoint_every
        return step == self.order.steps or (every is not None and step % every == 0)

    def save(self, step: int) -> Path:
        """`out_dir/checkpoint-<step>` (every process calls this; the main one writes). A sharded model's
        checkpoint holds its full weights and optimizer state, gathered by every process."""
        path = self.out_dir / f"checkpoint-{step}"
        gathered = full_checkpoint(self.model, self.optimizer) if self.config.fsdp else None
        rng = gather_to_main(_rng_state())
        if rng is not None:
            model_state, optimizer = gathered if gathered is not None else (None, self.optimizer.state_dict())
            state = {"step": step, "pairs_seen": min(step * self.order.per_step, self.order.total_pairs),
                     "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "ref_logp": self.ref_logp.cpu(), "run": self.run_signature,
                     "history": [asdict(h) for h in self.history], "config": self.config.describe()}
            _save_checkpoint(path, self.model, self.tokenizer, state, model_state)
        _barrier()
        return path


def _gathered(values: Tensor) -> Tensor:
    """`values` of every process, concatenated in rank order (the same on every process)."""
    if world()[1] == 1:
        return values
    parts: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(parts, values)
    return torch.cat(parts)


