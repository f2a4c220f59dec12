"""Trace handling and the numbers behind the figures: pure numpy functions, no matplotlib."""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import MarginscopeError
from ..trace.schema import Trace, open_trace
from ..trace.summary import Intervals

TraceLike = Trace | str | os.PathLike
Traces = TraceLike | Sequence[TraceLike]


def as_list(traces: Traces) -> list[TraceLike]:
    """One trace or a sequence of traces → a list."""
    if isinstance(traces, (Trace, str, os.PathLike)):
        return [traces]
    items = list(traces)
    if not items:
        raise MarginscopeError("no trace given")
    return items


@contextlib.contextmanager
def opened(trace: TraceLike) -> Iterator[Trace]:
    """A `Trace` for a trace or a path; a trace opened here is closed on exit."""
    if isinstance(trace, Trace):
        yield trace
        return
    with open_trace(trace) as tr:
        yield tr


@contextlib.contextmanager
def opened_all(traces: Traces) -> Iterator[list[Trace]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(opened(t)) for t in as_list(traces)]


def run_label(tr: Trace) -> str:
    """A short name for a run: the file name and the loss, e.g. "run-dpo.h5 · dpo"."""
    loss = tr.metadata.get("loss")
    return f"{tr.path.name} · {loss}" if loss else tr.path.name


def probe_index(tr: Trace, probe: str | None, default: int = 0) -> int:
    """Index of probe id `probe` (`default` when None); a one-line error naming the known ids."""
    if probe is None:
        return default
    ids = tr.probe_ids
    if probe not in ids:
        shown = ", ".join(ids[:8]) + (", …" if len(ids) > 8 else "")
        raise MarginscopeError(f"{tr.path}: no probe {probe!r} (probes: {shown})")
    return ids.index(probe)


def probe_slice(tr: Trace, probe: str | None) -> slice:
    """All probes, or the one named `probe`."""
    if probe is None:
        return slice(None)
    n = probe_index(tr, probe)
    return slice(n, n + 1)


def step_index(tr: Trace, steps: np.ndarray, step: int | None) -> int:
    """Index of logged step `step` in `steps` (the last when None); a one-line error otherwise."""
    if step is None:
        return len(steps) - 1
    hits = np.flatnonzero(steps == step)
    if not len(hits):
        shown = ", ".join(str(s) for s in steps[:12]) + (", …" if len(steps) > 12 else "")
        raise MarginscopeError(f"{tr.path}: step {step} is not recorded (steps: {shown or 'none'})")
    return int(hits[0])


def finite(a: Any) -> np.ndarray:
    """float64 copy with ±inf replaced by NaN (plots treat both as missing)."""
    a = np.array(a, dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def nanmean(a: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Mean of the finite entries along `axis`; NaN (and no warning) where there is none."""
    a = np.asarray(a, dtype=np.float64)
    ok = np.isfinite(a)
    count = ok.sum(axis=axis)
    total = np.where(ok, a, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def safe_div(a: Any, b: Any) -> np.ndarray:
    """a / b, NaN where b is 0 or either is non-finite (no warning)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    ok = (b != 0) & np.isfinite(a) & np.isfinite(b)
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=ok)


# ---- Cases ------------------------------------------------------------------------------------

def case_shares(case: np.ndarray) -> np.ndarray:
    """[S, 5]: fraction of the N pairs of each record in Case 0 (undetermined), 1, 2, 3, 4."""
    case = np.asarray(case, dtype=np.int64)
    counts = np.stack([(case == c).sum(axis=1) for c in range(5)], axis=1)
    return counts / max(case.shape[1], 1)


def dominant_case(case: np.ndarray) -> np.ndarray:
    """[S]: the most frequent determined Case (1–4) of each record; 0 when none is determined."""
    fractions = case_shares(case)[:, 1:]
    return np.where(fractions.max(axis=1) > 0, fractions.argmax(axis=1) + 1, 0)


@dataclass(frozen=True)
class CasePoints:
    """Flattened (record, probe) points of the case map."""

    x: np.ndarray  # ⟨a_w,a_l⟩/‖a_w‖² (÷ d_w/d_l when normalized)
    y: np.ndarray  # ⟨a_w,a_l⟩/‖a_l‖² (÷ d_l/d_w when normalized)
    t_w: np.ndarray  # d_w/d_l
    t_l: np.ndarray  # d_l/d_w
    step: np.ndarray
    probe: np.ndarray
    case: np.ndarray
    neg_w: np.ndarray  # bool: d_w < 0
    neg_l: np.ndarray  # bool: d_l < 0


def case_points(gram: np.ndarray, d_w: np.ndarray, d_l: np.ndarray, case: np.ndarray, steps: np.ndarray,
                w: int, l: int) -> CasePoints:
    """Case-map coordinates of every (record, probe) of gram [S, N, R, R], d_* and case [S, N]
    (margin-pitfalls §3.2: chosen rises iff x ≤ d_w/d_l, rejected falls iff y ≤ d_l/d_w, when d > 0)."""
    s, n = case.shape
    k = finite(gram)
    inner = k[:, :, w, l]
    dw, dl = finite(d_w), finite(d_l)
    return CasePoints(
        x=safe_div(inner, k[:, :, w, w]).ravel(), y=safe_div(inner, k[:, :, l, l]).ravel(),
        t_w=safe_div(dw, dl).ravel(), t_l=safe_div(dl, dw).ravel(),
        step=np.repeat(np.asarray(steps), n), probe=np.tile(np.arange(n), s),
        case=np.asarray(case, dtype=np.int64).ravel(), neg_w=(dw < 0).ravel(), neg_l=(dl < 0).ravel())


def quadrant_case(right: bool, top: bool, flip_x: bool, flip_y: bool) -> int:
    """The Case of a case-map quadrant. Chosen rises left of the vertical threshold and rejected falls
    below the horizontal one, each side swapped when `flip_x` / `flip_y` (a negative coefficient:
    raw coordinates flip x with d_l < 0 and y with d_w < 0, normalized ones x with d_w and y with d_l)."""
    chosen_up, rejected_down = right == flip_x, top == flip_y
    return {(True, True): 1, (False, True): 2, (True, False): 3, (False, False): 4}[(chosen_up, rejected_down)]


def constant(values: np.ndarray, rtol: float = 1e-6) -> bool:
    """True when the finite `values` are all equal (to rtol); vacuously for none."""
    v = values[np.isfinite(values)]
    return not v.size or float(np.ptp(v)) <= rtol * max(1.0, float(np.abs(v).max()))


def median_or(values: np.ndarray, default: float) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else default


# ---- gradient geometry ------------------------------------------------------------------------

def pair_cosine(gram: np.ndarray, w: int, l: int) -> np.ndarray:
    """cos(a_w, a_l) = K_wl / sqrt(K_ww K_ll) over the leading axes of gram [..., R, R]."""
    k = finite(gram)
    return safe_div(k[..., w, l], np.sqrt(np.clip(k[..., w, w] * k[..., l, l], 0.0, None)))


def gradient_terms(gram: np.ndarray, w: int, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilevel Theorem 1 terms: ‖a_w‖² − ⟨a_w,a_l⟩ (sign of Δπ_w) and ⟨a_w,a_l⟩ − ‖a_l‖² (sign of Δπ_l)."""
    k = finite(gram)
    return k[..., w, w] - k[..., w, l], k[..., w, l] - k[..., l, l]


@dataclass(frozen=True)
class InrunSeries:
    """In-run rows averaged per training step."""

    step: np.ndarray
    cosine: np.ndarray
    term_w: np.ndarray
    term_l: np.ndarray


def inrun_series(rows: dict[str, np.ndarray]) -> InrunSeries | None:
    """Per training step: mean cosine and mean Theorem 1 terms over the step's in-run pairs."""
    if not len(rows["step"]):
        return None
    steps, inverse = np.unique(rows["step"], return_inverse=True)
    inner, sq_w, sq_l = finite(rows["inner"]), finite(rows["sq_w"]), finite(rows["sq_l"])
    cosine = safe_div(inner, np.sqrt(np.clip(sq_w * sq_l, 0.0, None)))

    def per_step(values: np.ndarray) -> np.ndarray:
        ok = np.isfinite(values)
        total = np.bincount(inverse, np.where(ok, values, 0.0), len(steps))
        return safe_div(total, np.bincount(inverse, ok.astype(float), len(steps)))

    return InrunSeries(steps, per_step(cosine), per_step(sq_w - inner), per_step(inner - sq_l))


# ---- tokens -----------------------------------------------------------------------------------

def token_cosine(gram: np.ndarray, sq_w: np.ndarray, sq_l: np.ndarray) -> np.ndarray:
    """G[t,s] / sqrt(‖∇w_t‖²‖∇l_s‖²) over the leading axes of gram [..., T_w, T_l]."""
    denom = np.sqrt(np.clip(finite(sq_w)[..., :, None] * finite(sq_l)[..., None, :], 0.0, None))
    return safe_div(finite(gram), denom)


def differing_tokens(ids_w: Sequence[int], ids_l: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """bool masks over chosen and rejected tokens outside their longest common blocks (difflib),
    i.e. the tokens that make the two responses differ."""
    matcher = difflib.SequenceMatcher(a=list(ids_w), b=list(ids_l), autojunk=False)
    diff_w, diff_l = np.ones(len(ids_w), bool), np.ones(len(ids_l), bool)
    for block in matcher.get_matching_blocks():
        diff_w[block.a:block.a + block.size] = False
        diff_l[block.b:block.b + block.size] = False
    return diff_w, diff_l


def token_text(token_id: int, tokenizer: Any | None) -> str:
    """Tick label of one token: its decoded text (whitespace shown, `$` escaped), else its id."""
    if token_id < 0:
        return "·"
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([int(token_id)])
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    return text.strip() or repr(text)


def response_token_labels(tr: Trace, n: int, r: int, tokenizer: Any | None) -> list[str]:
    """Tick labels of the tokens of probe n's response r (`token_text` of its scored ids): the one
    place the token figures look labels up."""
    return [token_text(int(i), tokenizer) for i in tr.input_ids(n, r)[1]]


def position_regions(diff: np.ndarray) -> np.ndarray:
    """int [T] for a response's differing-token mask (`differing_tokens`): 0 before its first
    differing token, 1 at a differing token, 2 at a shared token after the first differing one."""
    diff = np.asarray(diff, dtype=bool)
    after = np.cumsum(diff) > 0
    return np.where(diff, 1, np.where(after, 2, 0))


def topk_gains(ids_first: np.ndarray, prob_first: np.ndarray, ids_last: np.ndarray,
               prob_last: np.ndarray) -> dict[int, float]:
    """Σ over positions of π_last(v) − π_first(v) for every token v in either record's top-k
    ([..., T, k] arrays; a token absent from a record's top-k counts as probability 0 there)."""
    gains: dict[int, float] = {}
    for ids, prob, sign in ((ids_last, prob_last, 1.0), (ids_first, prob_first, -1.0)):
        ok = (ids >= 0) & np.isfinite(prob)
        for token, p in zip(ids[ok].tolist(), prob[ok].astype(np.float64).tolist()):
            gains[token] = gains.get(token, 0.0) + sign * p
    return gains


class TraceVocabulary:
    """Decodes ids with the token texts a trace stores (`tokens/vocab_text`), like a tokenizer."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] if 0 <= i < len(self.vocab) else str(i) for i in (int(x) for x in ids))


def load_tokenizer_like(tokenizer: Any | None, tr: Trace | None = None) -> Any | None:
    """A tokenizer object as is; a path → the tokenizer saved there; None → the token texts stored
    in `tr` (a `TraceVocabulary`), else None (ids are shown)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..loading import load_tokenizer

        return load_tokenizer(tokenizer)
    if tokenizer is None and tr is not None:
        vocab = tr.vocab_text
        return TraceVocabulary(vocab) if vocab is not None else None
    return tokenizer


def token_gram_probes(tr: Trace) -> list[int]:
    """Indices of the probes whose per-token Gram was recorded (at least one committed row)."""
    found = []
    for n in range(len(tr.probe_ids)):
        tg = tr.token_gram(n)
        if tg is not None and len(tg["step"]):
            found.append(n)
    return found


# ---- what actually happened (DESIGN.md §2b) ---------------------------------------------------

def update_segments(iv: Intervals) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The observed change of every (interval, probe, response) as a sum of shares [S−1, N, R], in
    stacking order (the step parts, then "last_step", "rest", "curvature"):
    observed = Σ step_parts + last_step + rest + curvature, exactly, where the last optimizer step of
    the interval is split into its parts when the trace has them ("last_step" = its unsplit
    step_delta otherwise, 0 when not captured), "rest" = actual − step_delta (the interval's earlier
    steps and the trapezoid's correction) and "curvature" = observed − actual. Also the bool mask
    [S−1, N, R] of the points where observed and actual are finite (NaN outside it)."""
    observed, actual, step = finite(iv.observed), finite(iv.actual), finite(iv.step_delta)
    parts = {name: finite(v) for name, v in iv.step_parts.items()}
    valid = np.isfinite(observed) & np.isfinite(actual)
    split = np.logical_and.reduce([np.isfinite(v) for v in parts.values()]) & np.isfinite(step)
    captured = np.isfinite(step)
    shares = {name: np.where(split, v, 0.0) for name, v in parts.items()}
    shares["last_step"] = np.where(captured & ~split, step, 0.0)
    shares["rest"] = actual - np.where(captured, step, 0.0)
    shares["curvature"] = observed - actual
    return {name: np.where(valid, v, np.nan) for name, v in shares.items()}, valid
