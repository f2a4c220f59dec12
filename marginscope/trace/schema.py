"""The only owner of the HDF5 trace layout (documented in docs/trace-format.md).

A trace holds a probe set (texts and exact token ids, once), run metadata (root attributes), a
sequence of records (one per logged step, appended along the first axis of resizable datasets) and
in-run rows (per-pair geometry of training batches). Every object is created with the header, before
the writer enters SWMR mode, so readers can follow a run while it writes. The commit rule: in every
group the `step` dataset is written last and its length is the committed count.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np

from ..dynamics.optimizers import STEP_PARTS
from ..dynamics.scoring import EncodedProbe
from .integrity import open_swmr
from ..errors import MarginscopeError

SCHEMA = "marginscope-trace"
SCHEMA_VERSION = 4
# Older versions this reader opens: version 2 lacks the actual-update views (read as NaN / Case 0),
# versions 2 and 3 the per-pair attribution of in-run rows (read as NaN / "").
_READABLE_VERSIONS = (2, 3, 4)
# The named parts of `step_parts`: the optimizer's formula, then what it leaves of the actual update.
STEP_PART_NAMES = (*STEP_PARTS, "residual")
# SWMR needs the HDF5 1.10 file format; the low bound keeps traces readable by HDF5 ≥ 1.10.
_LIBVER = ("v110", "latest")

_RECORDS = "records"
_TOKEN_GRAM = "records/token_gram"
_INRUN = "inrun"

_STR = h5py.string_dtype("utf-8")
_IDS = h5py.vlen_dtype(np.dtype("int32"))
_RESERVED_ATTRS = ("schema", "schema_version")


@dataclass
class Record:
    """One logged step. Shapes: N probes, R responses, T = longest response, k = top_k."""

    step: int
    logp: np.ndarray  # [N, R]
    token_logp: np.ndarray  # [N, R, T], NaN-padded
    gram: np.ndarray  # [N, R, R]
    d_w: np.ndarray  # [N]
    d_l: np.ndarray  # [N]
    case: np.ndarray  # [N] int8, 0 = undetermined
    predicted_delta: np.ndarray  # [N, R], per unit learning rate
    observed_delta: np.ndarray  # [N, R], change since the previous record (NaN for the first)
    topk_ids: np.ndarray  # [N, R, T, k] int32, most probable first, −1 beyond a response
    topk_prob: np.ndarray  # [N, R, T, k] float32, NaN beyond a response
    token_gram: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    nonfinite: np.ndarray | None = None  # [N] bool; computed by the writer when None
    # What actually happened (DESIGN.md §2b); None = not measured (NaN, Case 0 in the file).
    actual_delta: np.ndarray | None = None  # [N, R] trapezoid first order along θ_now − θ_previous record
    actual_token_delta: np.ndarray | None = None  # [N, R, T] the same per token, NaN-padded
    step_delta: np.ndarray | None = None  # [N, R] ⟨a(θ_t), θ_t − θ_{t−1}⟩ of the step before the record
    step_parts: np.ndarray | None = None  # [N, R, P] its parts, STEP_PART_NAMES order
    case_observed: np.ndarray | None = None  # [N] int8 Case by the signs of observed_delta
    case_actual: np.ndarray | None = None  # [N] int8 Case by the signs of actual_delta


# Record datasets under /records: name → (dtype, dims after the leading step axis). `step` is last:
# it is written last, and its length is the committed count.
_RECORD_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "logp": (np.float64, ("probe", "response")),
    "token_logp": (np.float64, ("probe", "response", "position")),
    "topk_ids": (np.int32, ("probe", "response", "position", "k")),
    "topk_prob": (np.float32, ("probe", "response", "position", "k")),
    "gram": (np.float64, ("probe", "response", "response_j")),
    "d_w": (np.float64, ("probe",)),
    "d_l": (np.float64, ("probe",)),
    "case": (np.int8, ("probe",)),
    "nonfinite": (np.bool_, ("probe",)),
    "predicted_delta": (np.float64, ("probe", "response")),
    "observed_delta": (np.float64, ("probe", "response")),
    "actual_delta": (np.float64, ("probe", "response")),
    "actual_token_delta": (np.float64, ("probe", "response", "position")),
    "step_delta": (np.float64, ("probe", "response")),
    "step_parts": (np.float64, ("probe", "response", "part")),
    "case_observed": (np.int8, ("probe",)),
    "case_actual": (np.int8, ("probe",)),
    "step": (np.int64, ()),
}
# Fields a version-2 trace lacks, and the fill value its reader shows for them.
_V3_FIELDS = {"actual_delta": np.nan, "actual_token_delta": np.nan, "step_delta": np.nan, "step_parts": np.nan,
              "case_observed": 0, "case_actual": 0}

# /records/token_gram/<n>: name → (dtype, dims), T_w = chosen length, T_l = rejected length.
_TOKEN_GRAM_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "gram": (np.float64, ("position_w", "position_l")),
    "sqnorm_w": (np.float64, ("position_w",)),
    "sqnorm_l": (np.float64, ("position_l",)),
    "step": (np.int64, ()),
}

# /inrun: one row per training pair: name → (dtype, dims after the row axis); `step` last.
_INRUN_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "rank": (np.int16, ()), "pair": (np.int32, ()), "inner": (np.float64, ()), "sq_w": (np.float64, ()),
    "sq_l": (np.float64, ()), "scale_w": (np.float64, ()), "scale_l": (np.float64, ()),
    "logp_w": (np.float64, ()), "logp_l": (np.float64, ()), "case": (np.int8, ()),
    "probe_effect": (np.float64, ("probe", "response")), "effect_scale": (np.float64, ()),
    "pair_id": (_STR, ()), "prompt": (_STR, ()), "chosen": (_STR, ()), "rejected": (_STR, ()),
    "step": (np.int64, ()),
}
# In-run fields traces before version 4 lack, and the value their reader shows.
_V4_INRUN_FIELDS = {"probe_effect": np.nan, "effect_scale": np.nan, "pair_id": "", "prompt": "", "chosen": "",
                    "rejected": ""}
_INRUN_TEXT = ("pair_id", "prompt", "chosen", "rejected")

# The large per-token record datasets are compressed (see benchmarks/bench_trace_append.py).
_COMPRESSED = {"token_logp", "topk_ids", "topk_prob", "actual_token_delta", "probe_effect"}
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_INRUN_CHUNK = 4096
_COPY_BYTES = 64 << 20  # bytes copied per block when resume rebuilds a trace


@dataclass(frozen=True)
class _Dims:
    """Sizes of a trace's record axes."""

    probe: int
    response: int
    position: int
    k: int

    def shape(self, dims: tuple[str, ...], position_w: int = 0, position_l: int = 0) -> tuple[int, ...]:
        size = {"probe": self.probe, "response": self.response, "response_j": self.response,
                "position": self.position, "k": self.k, "part": len(STEP_PART_NAMES),
                "position_w": position_w, "position_l": position_l}
        return tuple(size[d] for d in dims)

    @classmethod
    def of(cls, f: h5py.File) -> _Dims:
        _, n, r, t, k = f[_RECORDS]["topk_ids"].shape
        return cls(n, r, t, k)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def nonfinite_probes(record: Record) -> np.ndarray:
    """bool [N]: True where any of the probe's logp, gram, d_w, d_l or predicted_delta is NaN or inf."""
    finite = (np.isfinite(record.logp).all(axis=1) & np.isfinite(record.gram).all(axis=(1, 2))
              & np.isfinite(record.d_w) & np.isfinite(record.d_l)
              & np.isfinite(record.predicted_delta).all(axis=1))
    return ~finite


# ---- creating the layout ----------------------------------------------------------------------

def _resizable(group: h5py.Group, name: str, dtype: Any, shape: tuple[int, ...], compress: bool = False,
               rows: int = 1) -> None:
    """An empty dataset growing along axis 0: chunks of `rows` rows (one record), or 1-D chunks of
    in-run rows."""
    group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                         chunks=(rows, *shape) if shape else (_INRUN_CHUNK,),
                         **(_COMPRESSION if compress else {}))


def _create_datasets(f: h5py.File, dims: _Dims, token_gram_shapes: dict[int, tuple[int, int]]) -> None:
    """Every appendable dataset, empty: /records, /records/token_gram/<n>, /inrun."""
    rec = f.create_group(_RECORDS)
    rec.attrs["step_parts"] = json.dumps(list(STEP_PART_NAMES))
    for name, (dtype, axes) in _RECORD_FIELDS.items():
        _resizable(rec, name, dtype, dims.shape(axes), compress=name in _COMPRESSED)
    tg = f.create_group(_TOKEN_GRAM)
    for n, (t_w, t_l) in sorted(token_gram_shapes.items()):
        grp = tg.create_group(str(n))
        for name, (dtype, axes) in _TOKEN_GRAM_FIELDS.items():
            _resizable(grp, name, dtype, dims.shape(axes, t_w, t_l))
    inrun = f.create_group(_INRUN)
    for name, (dtype, axes) in _INRUN_FIELDS.items():
        _resizable(inrun, name, dtype, dims.shape(axes), compress=name in _COMPRESSED, rows=64)


def _check_header_inputs(path: Path, probes, encoded: Sequence[EncodedProbe], names: Sequence[str],
                         metadata: dict[str, Any], ref_logp: np.ndarray | None, top_k: int,
                         token_gram_shapes: dict[int, tuple[int, int]]) -> None:
    """Refuse inconsistent header inputs before anything is written."""
    n, r = len(encoded), len(names)
    if top_k < 1:
        raise MarginscopeError(f"{path}: top_k must be ≥ 1; got {top_k}")
    if n == 0 or n != len(probes) or any(e.probe_id != p.id for e, p in zip(encoded, probes)):
        raise MarginscopeError(f"{path}: the encoded probes do not match the probe set")
    if any(len(e.response_ids) != r for e in encoded) or list(names) != list(probes.response_names):
        raise MarginscopeError(f"{path}: response names {list(names)} do not match the probe set's "
                               f"{probes.response_names} or the encoded responses")
    if ref_logp is not None and np.shape(ref_logp) != (n, r):
        raise MarginscopeError(f"{path}: ref_logp has shape {np.shape(ref_logp)}, expected {(n, r)}")
    reserved = set(metadata) & set(_RESERVED_ATTRS)
    if reserved:
        raise MarginscopeError(f"{path}: metadata keys {sorted(reserved)} are reserved")
    for i, shape in token_gram_shapes.items():
        expected = (len(encoded[i].response_ids[0]), len(encoded[i].response_ids[1])) if 0 <= i < n else None
        if tuple(shape) != expected:
            raise MarginscopeError(f"{path}: token_gram_shapes[{i}] = {tuple(shape)}, expected the chosen × "
                                   f"rejected lengths {expected} of a probe index in 0..{n - 1}")


def _write_header(f: h5py.File, *, probes, encoded: Sequence[EncodedProbe], names: Sequence[str],
                  metadata: dict[str, Any], ref_logp: np.ndarray | None, top_k: int,
                  token_gram_shapes: dict[int, tuple[int, int]], vocab_text: Sequence[str] | None = None) -> None:
    """Root attributes, /probes, /tokens, /reference and the empty appendable datasets."""
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = SCHEMA_VERSION
    for key, value in metadata.items():
        f.attrs[key] = json.dumps(_jsonable(value))
    n, r = len(encoded), len(names)
    g = f.create_group("probes")
    g.attrs["names"] = json.dumps(list(names))
    g.attrs["fingerprint"] = probes.fingerprint()
    g.create_dataset("id", data=[p.id for p in probes], dtype=_STR)
    g.create_dataset("prompt", data=[p.prompt for p in probes], dtype=_STR)
    g.create_dataset("response", data=[[p.responses[k] for k in names] for p in probes], dtype=_STR)
    t = f.create_group("tokens")
    prompt_ids = t.create_dataset("prompt_ids", shape=(n,), dtype=_IDS)
    response_ids = t.create_dataset("response_ids", shape=(n, r), dtype=_IDS)
    for i, e in enumerate(encoded):
        prompt_ids[i] = np.asarray(e.prompt_ids, dtype=np.int32)
        for j, ids in enumerate(e.response_ids):
            response_ids[i, j] = np.asarray(ids, dtype=np.int32)
    lengths = np.array([[len(x) for x in e.response_ids] for e in encoded], dtype=np.int32)
    t.create_dataset("lengths", data=lengths)
    if vocab_text is not None:  # each token id's text: figures show words without the tokenizer
        t.create_dataset("vocab_text", data=list(vocab_text), dtype=_STR, compression="gzip")
    if ref_logp is not None:
        f.create_dataset("reference/logp", data=np.asarray(ref_logp, dtype=np.float64))
    _create_datasets(f, _Dims(n, r, int(lengths.max()), top_k), token_gram_shapes)


# ---- opening and reading committed rows ------------------------------------------------------

def _open_checked(path: Path) -> h5py.File:
    """Open a trace read-only in SWMR mode (also while a run writes it, or after its writer was
    killed); one-line MarginscopeError for a missing file, non-HDF5, truncated or damaged (within a
    second or so: `integrity.open_swmr`), non-trace or other version."""
    if not path.is_file():
        raise MarginscopeError(f"{path}: no such trace file")
    f = open_swmr(path)
    try:
        if f.attrs.get("schema") != SCHEMA:
            raise MarginscopeError(f"{path}: not a marginscope trace (no '{SCHEMA}' schema attribute)")
        version = f.attrs.get("schema_version")
        if version not in _READABLE_VERSIONS:
            raise MarginscopeError(f"{path}: trace schema version {version}; this marginscope reads versions "
                                   f"{', '.join(map(str, _READABLE_VERSIONS))} (re-create the trace)")
    except BaseException:
        f.close()
        raise
    return f


def _committed(group: h5py.Group) -> int:
    """The committed row count of a group: the length of its `step` dataset, refreshed."""
    step = group["step"]
    step.refresh()
    return step.shape[0]


def _read_rows(group: h5py.Group, name: str, stop: int, start: int = 0) -> np.ndarray:
    """Rows [start, stop) of one dataset, refreshed first (stop ≤ the committed count)."""
    ds = group[name]
    ds.refresh()
    return ds[start:stop]


def _token_gram_count(f: h5py.File, n: int, last_step: int | None) -> int:
    """Committed token-Gram rows of probe n that belong to committed records (step ≤ last_step)."""
    grp = f[f"{_TOKEN_GRAM}/{n}"]
    if last_step is None:
        return 0
    steps = _read_rows(grp, "step", _committed(grp))
    return int(np.searchsorted(steps, last_step, side="right"))


def _token_gram_probes(f: h5py.File) -> list[int]:
    """Probe indices that have a per-token Gram group, ascending."""
    return sorted(int(n) for n in f[_TOKEN_GRAM])


# ---- writing -------------------------------------------------------------------------------


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise MarginscopeError(f"{path}: is a directory, expected an output .h5 file path")
    if not path.parent.is_dir():
        raise MarginscopeError(f"{path}: folder {path.parent} does not exist")


def _write_rows(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write rows [start, start + len(values)), growing the dataset to exactly that length."""
    ds.resize(start + len(values), axis=0)
    ds[start:start + len(values)] = values


def _build_swmr(path: Path, build: Callable[[h5py.File], None]) -> h5py.File:
    """Build a file in a temp path beside `path`, enter SWMR-write mode, then rename it into place:
    the path only ever holds a complete trace that SWMR readers can open."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    f = None
    try:
        f = h5py.File(tmp, "w", libver=_LIBVER)
        build(f)
        f.swmr_mode = True
        os.replace(tmp, path)
        return f
    except BaseException:
        if f is not None:
            f.close()
        Path(tmp).unlink(missing_ok=True)
        raise


class TraceWriter:
    """Appends records and in-run rows to a trace open in SWMR-write mode (readers may follow)."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = path
        self._f = f
        self._dims = _Dims.of(f)
        self._records = f[_RECORDS]["step"].shape[0]
        self._inrun = f[_INRUN]["step"].shape[0]
        self._token_gram = {n: f[f"{_TOKEN_GRAM}/{n}/step"].shape[0] for n in _token_gram_probes(f)}

    @classmethod
    def create(cls, path: str | Path, *, probes, encoded: Sequence[EncodedProbe], names: Sequence[str],
               metadata: dict[str, Any], ref_logp: np.ndarray | None, top_k: int,
               token_gram_shapes: dict[int, tuple[int, int]], overwrite: bool = False,
               vocab_text: Sequence[str] | None = None) -> TraceWriter:
        """Write the header and every (empty) dataset, atomically, then open for appending.
        vocab_text: the text of every token id (`tokens/vocab_text`), e.g. `scoring.vocabulary_text`."""
        path = Path(path)
        _check_target(path)
        if path.exists() and not overwrite:
            raise MarginscopeError(f"{path}: exists; pass overwrite=True to replace it, or resume it "
                                   "with TraceWriter.resume")
        _check_header_inputs(path, probes, encoded, names, metadata, ref_logp, top_k, token_gram_shapes)
        f = _build_swmr(path, lambda f: _write_header(
            f, probes=probes, encoded=encoded, names=names, metadata=metadata, ref_logp=ref_logp,
            top_k=top_k, token_gram_shapes=token_gram_shapes, vocab_text=vocab_text))
        return cls(path, f)

    @classmethod
    def resume(cls, path: str | Path, *, probes, names: Sequence[str], step: int, top_k: int) -> TraceWriter:
        """Continue a run resumed from a checkpoint at `step`: keep the committed records (and
        token-Gram and in-run rows) with step ≤ `step`, drop the rest, and append to the same path.
        The kept content is rebuilt into a temp file renamed over the original, so this also works
        on a file whose writer was killed (never closed)."""
        path = Path(path)
        with _open_checked(path) as src:
            if src.attrs["schema_version"] != SCHEMA_VERSION:
                raise MarginscopeError(f"{path}: schema version {src.attrs['schema_version']} cannot be resumed "
                                       f"by this marginscope (writes version {SCHEMA_VERSION}); start a new trace")
            _check_same_run(path, src, probes, names, top_k)
            f = _build_swmr(path, lambda dst: _copy_until(src, dst, step))
        return cls(path, f)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def steps(self) -> np.ndarray:
        """int64 [S]: steps of the committed records."""
        return self._f[_RECORDS]["step"][:self._records]

    @property
    def ref_logp(self) -> np.ndarray | None:
        return self._f["reference/logp"][()] if "reference" in self._f else None

    def last_logp(self) -> np.ndarray | None:
        """float64 [N, R]: logp of the last committed record, None before the first."""
        return self._f[_RECORDS]["logp"][self._records - 1] if self._records else None

    def append(self, record: Record) -> None:
        """Append one record (and its per-token Grams); `step` datasets last, then flush."""
        values = self._record_values(record)
        grams = self._token_gram_values(record)
        rec, c = self._f[_RECORDS], self._records
        for name, value in values.items():
            _write_rows(rec[name], c, value[None])
        for n, fields in grams.items():
            for name, value in fields.items():
                _write_rows(self._f[f"{_TOKEN_GRAM}/{n}/{name}"], self._token_gram[n], value[None])
        self._f.flush()
        for n in grams:
            _write_rows(self._f[f"{_TOKEN_GRAM}/{n}/step"], self._token_gram[n], np.array([record.step]))
        _write_rows(rec["step"], c, np.array([record.step]))
        self._f.flush()
        self._records += 1
        for n in grams:
            self._token_gram[n] += 1

    def append_inrun(self, step: int, *, rank: int = 0, pair_start: int = 0, inner, sq_w, sq_l,
                     scale_w, scale_l, case, logp_w=None, logp_l=None, probe_effect=None, effect_scale=None,
                     texts: dict[str, Sequence[str]] | None = None) -> None:
        """Append the P pairs of one training step (pair = pair_start + 0..P−1); logp NaN when not
        given; probe_effect [P, N, R] (each pair's share of the step's gradient-part effect on the
        probes) and effect_scale [P] NaN when not given; texts {"pair_id", "prompt", "chosen",
        "rejected": P strings each} "" when not given; `step` last, then flush."""
        p = len(inner)
        nan = np.full(p, np.nan)
        cols = {"rank": np.full(p, rank), "pair": pair_start + np.arange(p), "inner": inner, "sq_w": sq_w,
                "sq_l": sq_l, "scale_w": scale_w, "scale_l": scale_l,
                "logp_w": nan if logp_w is None else logp_w, "logp_l": nan if logp_l is None else logp_l,
                "case": case, "effect_scale": nan if effect_scale is None else effect_scale,
                "probe_effect": (np.full((p, self._dims.probe, self._dims.response), np.nan)
                                 if probe_effect is None else probe_effect)}
        for name in _INRUN_TEXT:
            cols[name] = np.array([""] * p if texts is None or name not in texts else list(texts[name]), dtype=object)
        cols = {name: np.asarray(v, dtype=_INRUN_FIELDS[name][0]) for name, v in cols.items()}
        bad = [name for name, v in cols.items() if v.shape != (p, *self._dims.shape(_INRUN_FIELDS[name][1]))]
        if bad:
            raise MarginscopeError(f"{self.path}: in-run columns {bad} do not have {p} rows (len(inner)) of "
                                   "the expected shape")
        inrun, c = self._f[_INRUN], self._inrun
        for name, value in cols.items():
            _write_rows(inrun[name], c, value)
        self._f.flush()
        _write_rows(inrun["step"], c, np.full(p, step, dtype=np.int64))
        self._f.flush()
        self._inrun += p

    def _record_values(self, record: Record) -> dict[str, np.ndarray]:
        """The record's datasets except `step`, cast and shape-checked (nothing is written on error)."""
        last = self._f[_RECORDS]["step"][self._records - 1] if self._records else None
        if last is not None and record.step <= last:
            raise MarginscopeError(f"{self.path}: record step {record.step} is not after the last "
                                   f"recorded step {last}")
        nonfinite = nonfinite_probes(record) if record.nonfinite is None else record.nonfinite
        values = {}
        for name, (dtype, axes) in _RECORD_FIELDS.items():
            if name == "step":
                continue
            value = nonfinite if name == "nonfinite" else getattr(record, name)
            if value is None:  # a view not measured for this record
                value = np.full(self._dims.shape(axes), _V3_FIELDS[name])
            value = np.asarray(value, dtype=dtype)
            if value.shape != self._dims.shape(axes):
                raise MarginscopeError(f"{self.path}: record field {name} has shape {value.shape}, "
                                       f"expected {self._dims.shape(axes)}")
            values[name] = value
        return values

    def _token_gram_values(self, record: Record) -> dict[int, dict[str, np.ndarray]]:
        """The record's per-token Grams by probe index, shape-checked against the file's groups."""
        out = {}
        for n, arrays in record.token_gram.items():
            if n not in self._token_gram:
                raise MarginscopeError(f"{self.path}: no per-token Gram group for probe index {n} (the "
                                       f"trace has {sorted(self._token_gram)}; declare it in token_gram_shapes)")
            grp = self._f[f"{_TOKEN_GRAM}/{n}"]
            out[n] = {}
            for name, value in zip(("gram", "sqnorm_w", "sqnorm_l"), arrays):
                value = np.asarray(value, dtype=np.float64)
                if value.shape != grp[name].shape[1:]:
                    raise MarginscopeError(f"{self.path}: token_gram[{n}] {name} has shape {value.shape}, "
                                           f"expected {grp[name].shape[1:]}")
                out[n][name] = value
        return out


def _check_same_run(path: Path, f: h5py.File, probes, names: Sequence[str], top_k: int) -> None:
    """Refuse to resume a trace of another probe set, other response names or another top_k."""
    fingerprint = str(f["probes"].attrs["fingerprint"])
    if fingerprint != probes.fingerprint():
        raise MarginscopeError(f"{path}: written for another probe set (fingerprint {fingerprint[:12]}…, "
                               f"this run's {probes.fingerprint()[:12]}…); resume with the same probes")
    stored = json.loads(f["probes"].attrs["names"])
    if stored != list(names):
        raise MarginscopeError(f"{path}: response names {stored} differ from this run's {list(names)}")
    stored_k = _Dims.of(f).k
    if stored_k != top_k:
        raise MarginscopeError(f"{path}: top_k {stored_k} differs from this run's top_k {top_k}")


def _copy_until(src: h5py.File, dst: h5py.File, step: int) -> None:
    """Copy the header of `src` into `dst` and the committed rows with step ≤ `step`."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name in ("probes", "tokens", "reference"):
        if name in src:
            src.copy(src[name], dst, name)
    shapes = {n: src[f"{_TOKEN_GRAM}/{n}/gram"].shape[1:] for n in _token_gram_probes(src)}
    _create_datasets(dst, _Dims.of(src), shapes)
    rec_steps = _copy_group(src[_RECORDS], dst[_RECORDS], _RECORD_FIELDS, step)
    for n in shapes:
        path = f"{_TOKEN_GRAM}/{n}"
        _copy_group(src[path], dst[path], _TOKEN_GRAM_FIELDS, rec_steps[-1] if len(rec_steps) else -np.inf)
    _copy_group(src[_INRUN], dst[_INRUN], {name: None for name in _INRUN_FIELDS}, step)


def _copy_group(src: h5py.Group, dst: h5py.Group, fields: dict[str, Any], max_step: float) -> np.ndarray:
    """Copy the committed rows with step ≤ max_step of every dataset (`step` last), in
    bounded-memory blocks; returns the kept steps."""
    steps = _read_rows(src, "step", _committed(src))
    keep = steps <= max_step
    for name in fields:
        ds = src[name]
        ds.refresh()
        row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
        block = max(1, _COPY_BYTES // row_bytes)
        written = 0
        for start in range(0, len(keep), block):
            rows = ds[start:min(len(keep), start + block)][keep[start:start + block]]
            _write_rows(dst[name], written, rows)
            written += len(rows)
    return steps[keep]


def write_trace(path: str | Path, *, probes, encoded: Sequence[EncodedProbe], names: Sequence[str],
                metadata: dict[str, Any], records: Sequence[Record], ref_logp: np.ndarray | None = None,
                top_k: int, token_gram_shapes: dict[int, tuple[int, int]] | None = None,
                vocab_text: Sequence[str] | None = None) -> Path:
    """Write a complete trace atomically (a temp file in the same folder, then a rename), replacing
    any file at `path`; a failure never leaves a file there. `token_gram_shapes` defaults to the
    records' per-token Gram shapes; `vocab_text` as in `TraceWriter.create`."""
    path = Path(path)
    _check_target(path)
    if token_gram_shapes is None:
        token_gram_shapes = {n: np.shape(g[0]) for rec in records for n, g in rec.token_gram.items()}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with TraceWriter.create(tmp, probes=probes, encoded=encoded, names=names, metadata=metadata,
                                ref_logp=ref_logp, top_k=top_k, token_gram_shapes=token_gram_shapes,
                                vocab_text=vocab_text) as w:
            for record in records:
                w.append(record)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- the reader ------------------------------------------------------------------------------

class Trace:
    """Read access to a trace: numpy arrays indexed [step, probe, response, ...].

    The file is open in SWMR-read mode; every accessor re-reads the committed count, so a trace
    opened early sees records as the writer commits them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f: h5py.File = _open_checked(self.path)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def refresh(self) -> int:
        """Re-read every appendable dataset; returns the committed record count."""
        groups = [self._f[_RECORDS], self._f[_INRUN],
                  *(self._f[f"{_TOKEN_GRAM}/{n}"] for n in _token_gram_probes(self._f))]
        for group in groups:
            for ds in group.values():
                if isinstance(ds, h5py.Dataset):
                    ds.refresh()
        return self._count()

    def _count(self) -> int:
        return _committed(self._f[_RECORDS])

    def _records(self, name: str, count: int | None = None) -> np.ndarray:
        count = self._count() if count is None else count
        if name not in self._f[_RECORDS]:  # a version-2 trace: the views it does not hold
            dtype, axes = _RECORD_FIELDS[name]
            return np.full((count, *_Dims.of(self._f).shape(axes)), _V3_FIELDS[name], dtype=dtype)
        return _read_rows(self._f[_RECORDS], name, count)

    @property
    def metadata(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._f.attrs.items() if k not in _RESERVED_ATTRS}

    @property
    def schema_version(self) -> int:
        return int(self._f.attrs["schema_version"])

    @property
    def names(self) -> list[str]:
        return json.loads(self._f["probes"].attrs["names"])

    @property
    def probe_ids(self) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else x for x in self._f["probes/id"][()]]

    @property
    def fingerprint(self) -> str:
        return str(self._f["probes"].attrs["fingerprint"])

    @property
    def lengths(self) -> np.ndarray:
        return self._f["tokens/lengths"][()].astype(np.int64)

    @property
    def ref_logp(self) -> np.ndarray | None:
        return self._f["reference/logp"][()] if "reference" in self._f else None

    @property
    def top_k(self) -> int:
        return _Dims.of(self._f).k

    steps = property(lambda self: self._records("step"), doc="int64 [S] logged steps")
    logp = property(lambda self: self._records("logp"), doc="float64 [S, N, R] sequence log-probs")
    token_logp = property(lambda self: self._records("token_logp"), doc="float64 [S, N, R, T], NaN-padded")
    gram = property(lambda self: self._records("gram"), doc="float64 [S, N, R, R] log-prob gradient Gram")
    d_w = property(lambda self: self._records("d_w"), doc="float64 [S, N] −∂ℓ/∂log π_w")
    d_l = property(lambda self: self._records("d_l"), doc="float64 [S, N] +∂ℓ/∂log π_l")
    case = property(lambda self: self._records("case"), doc="int8 [S, N] Case 1–4 (0 = undetermined)")
    nonfinite = property(lambda self: self._records("nonfinite"),
                         doc="bool [S, N] any of logp, gram, d_w, d_l, predicted_delta NaN or inf")
    predicted_delta = property(lambda self: self._records("predicted_delta"),
                               doc="float64 [S, N, R] first-order Δlog π per unit learning rate")
    observed_delta = property(lambda self: self._records("observed_delta"),
                              doc="float64 [S, N, R] Δlog π since the previous record")
    actual_delta = property(lambda self: self._records("actual_delta"),
                            doc="float64 [S, N, R] ½⟨a(θ_prev) + a(θ_now), θ_now − θ_prev⟩ over the interval "
                                "ending at each record (θ_prev: the previous record); NaN at the first")
    actual_token_delta = property(lambda self: self._records("actual_token_delta"),
                                  doc="float64 [S, N, R, T] actual_delta per response token; NaN-padded")
    step_delta = property(lambda self: self._records("step_delta"),
                          doc="float64 [S, N, R] ⟨a(θ_t), θ_t − θ_{t−1}⟩ of the optimizer step before each "
                              "record; NaN where not captured")
    case_observed = property(lambda self: self._records("case_observed"),
                             doc="int8 [S, N] Case by the signs of observed_delta (0 = undetermined)")
    case_actual = property(lambda self: self._records("case_actual"),
                           doc="int8 [S, N] Case by the signs of actual_delta (0 = undetermined)")

    @property
    def step_parts(self) -> dict[str, np.ndarray]:
        """{part: float64 [S, N, R]}: step_delta split by the optimizer's formula ("gradient",
        "momentum", "weight_decay") and "residual" (the actual update minus the formula's: float
        rounding); the parts sum to step_delta. NaN where the split is unavailable (metadata
        "step_split" says why)."""
        values = self._records("step_parts")
        return {name: values[..., k] for k, name in enumerate(STEP_PART_NAMES)}

    topk_ids = property(lambda self: self._records("topk_ids"),
                        doc="int32 [S, N, R, T, k] most probable next tokens, most probable first; −1 padding")
    topk_prob = property(lambda self: self._records("topk_prob"),
                         doc="float32 [S, N, R, T, k] their probabilities; NaN padding")
    argmax_ids = property(lambda self: self.topk_ids[..., 0], doc="int32 [S, N, R, T] argmax token y*_t")
    argmax_prob = property(lambda self: self.topk_prob[..., 0], doc="float32 [S, N, R, T] π(y*_t)")
    target_prob = property(lambda self: np.exp(self.token_logp), doc="float64 [S, N, R, T] π(y_t) of the target")

    def input_ids(self, n: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_ids, response_ids) scored for probe n, response r."""
        return (self._f["tokens/prompt_ids"][n].astype(np.int64),
                self._f["tokens/response_ids"][n, r].astype(np.int64))

    @property
    def vocab_text(self) -> list[str] | None:
        """The text of every token id (index = id; `tokens/vocab_text`), None in traces without it."""
        if "tokens/vocab_text" not in self._f:
            return None
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in self._f["tokens/vocab_text"][()]]

    def token_text(self, ids) -> list[str]:
        """Each id's text from `vocab_text` (its id as a string when the trace has none or it is out of range)."""
        vocab = self.vocab_text or []
        return [vocab[i] if 0 <= i < len(vocab) else str(i) for i in (int(x) for x in ids)]

    def token_gram(self, n: int) -> dict[str, np.ndarray] | None:
        """Per-token Gram of probe index n over its committed records: step [S'], gram [S', T_w, T_l],
        sqnorm_w [S', T_w], sqnorm_l [S', T_l]; None when the trace has none for n."""
        key = f"{_TOKEN_GRAM}/{n}"
        if key not in self._f:
            return None
        steps = self.steps
        count = _token_gram_count(self._f, n, int(steps[-1]) if len(steps) else None)
        return {name: _read_rows(self._f[key], name, count) for name in _TOKEN_GRAM_FIELDS}

    def inrun(self) -> dict[str, np.ndarray]:
        """The committed in-run rows (one per training pair), arrays with one row each: step, rank,
        pair, inner, sq_w, sq_l, scale_w, scale_l, logp_w, logp_l, case; probe_effect float64
        [rows, N, R] (nats: the pair's share of the gradient part's first-order effect on each probe
        response over the step before a record, NaN on other steps), effect_scale (κ, see
        `ms.dynamics.attribution`); pair_id, prompt, chosen, rejected: str ("" where not recorded)."""
        grp = self._f[_INRUN]
        count = _committed(grp)
        out = {}
        for name, (dtype, axes) in _INRUN_FIELDS.items():
            if name not in grp:  # a trace before version 4
                fill = _V4_INRUN_FIELDS[name]
                out[name] = (np.full((count, *_Dims.of(self._f).shape(axes)), fill) if name not in _INRUN_TEXT
                             else np.array([fill] * count, dtype=object))
            elif name in _INRUN_TEXT:
                out[name] = np.array([v.decode("utf-8") if isinstance(v, bytes) else v
                                      for v in _read_rows(grp, name, count)], dtype=object)
            else:
                out[name] = _read_rows(grp, name, count)
        return out

    def to_xarray(self):
        """An `xarray.Dataset` of the committed records: dims (step, probe, response, response_j,
        position, k, part), one variable per record dataset plus lengths and ref_logp; per-token Grams as
        token_gram / token_sqnorm_w / token_sqnorm_l over (step, token_gram_probe, position_w,
        position_l), NaN where not recorded."""
        import xarray as xr

        count = self._count()
        rec = {name: self._records(name, count) for name in _RECORD_FIELDS}
        data = {name: (("step", *axes), rec[name]) for name, (_, axes) in _RECORD_FIELDS.items() if name != "step"}
        data["lengths"] = (("probe", "response"), self.lengths)
        if self.ref_logp is not None:
            data["ref_logp"] = (("probe", "response"), self.ref_logp)
        coords: dict[str, Any] = {"step": rec["step"], "probe": self.probe_ids, "response": self.names,
                                  "response_j": self.names, "part": list(STEP_PART_NAMES)}
        tg_probes = _token_gram_probes(self._f)
        if tg_probes:
            data.update(self._token_gram_arrays(rec["step"], tg_probes))
            coords["token_gram_probe"] = [self.probe_ids[n] for n in tg_probes]
        attrs = {"trace": str(self.path), "schema_version": self.schema_version,
                 "metadata": json.dumps(self.metadata)}
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def _token_gram_arrays(self, steps: np.ndarray, probes: list[int]) -> dict[str, tuple]:
        """NaN-padded per-token Gram arrays [S, P, T, T] aligned on the record steps."""
        t = _Dims.of(self._f).position
        gram = np.full((len(steps), len(probes), t, t), np.nan)
        sq_w = np.full((len(steps), len(probes), t), np.nan)
        sq_l = np.full((len(steps), len(probes), t), np.nan)
        for i, n in enumerate(probes):
            tg = self.token_gram(n)
            keep = np.isin(tg["step"], steps)
            rows = np.searchsorted(steps, tg["step"][keep])
            t_w, t_l = tg["gram"].shape[1:]
            gram[rows, i, :t_w, :t_l] = tg["gram"][keep]
            sq_w[rows, i, :t_w] = tg["sqnorm_w"][keep]
            sq_l[rows, i, :t_l] = tg["sqnorm_l"][keep]
        return {"token_gram": (("step", "token_gram_probe", "position_w", "position_l"), gram),
                "token_sqnorm_w": (("step", "token_gram_probe", "position_w"), sq_w),
                "token_sqnorm_l": (("step", "token_gram_probe", "position_l"), sq_l)}


def open_trace(path: str | Path) -> Trace:
    """Open a trace for reading (`ms.trace.open`), also while a run is writing it."""
    return Trace(path)
