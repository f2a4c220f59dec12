"""Synthetic traces for the figure, report and notebook tests: consistent numbers from numpy, fast.

`make_trace` writes a trace with `write_trace` whose Grams come from random gradient vectors, whose
coefficients, Cases and first-order predictions come from the real loss (`ms.dynamics`), and whose
observed changes are the differences of the recorded log-probs — so every loss of the zoo gives its
own thresholds and signs. The actual-update views (DESIGN.md §2b) are consistent with them: the
actual-update first order is the observed change less a small curvature share, split over the
response tokens; the last step's parts (AdamW's gradient, momentum, weight decay and a rounding
residual) sum to its `step_delta`; the Cases of what happened come from `ms.dynamics.classify_delta`.
Edge traces: one record, NaNs, a single probe, no per-token data, no in-run rows, no top response,
no finite Gram at all, no actual-update views (as a version-2 trace reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

import marginscope as ms
from marginscope.dynamics.scoring import EncodedProbe
from marginscope.trace import Record, write_trace
from marginscope.trace.schema import STEP_PART_NAMES

VOCAB = 300  # ids below the tiny demo tokenizer's vocabulary size, so they decode


def _probe_set(n: int, names: Sequence[str]) -> ms.probes.ProbeSet:
    records = []
    for i in range(n):
        rec = {"id": f"q{i}", "prompt": f"Prompt {i}. The sentiment is", "chosen": " positive.", "rejected": " negative."}
        if "top" in names:
            rec["extra"] = {"top": " great"}
        records.append(rec)
    return ms.probes.ProbeSet.from_records(records)


def _encoded(rng: np.random.Generator, probes, names: Sequence[str]) -> list[EncodedProbe]:
    """Chosen/rejected share a suffix and differ in their first token (margin-pitfalls §4.2 style)."""
    out = []
    for p in probes:
        suffix = tuple(int(t) for t in rng.integers(3, VOCAB, rng.integers(1, 6)))
        first_w, first_l = (int(t) for t in rng.choice(np.arange(3, VOCAB), 2, replace=False))
        responses = [(first_w, *suffix), (first_l, *suffix)]
        responses += [tuple(int(t) for t in rng.integers(3, VOCAB, rng.integers(1, 4))) for _ in names[2:]]
        out.append(EncodedProbe(p.id, (1, *map(int, rng.integers(3, VOCAB, 4))), tuple(responses)))
    return out


def make_trace(path: str | Path, *, loss: str = "dpo", n_probes: int = 4, steps: Sequence[int] = (0, 2, 4, 6),
               names: Sequence[str] = ("chosen", "rejected", "top"), per_token: Sequence[int] = (0,),
               inrun: bool = True, nan: bool = False, no_gram: bool = False, top_k: int = 3,
               ref_offset: float = 0.0, update: bool = True, seed: int = 0) -> Path:
    """Write a synthetic trace of `loss` and return its path (see the module docstring). `ref_offset`
    lowers the chosen reference log-probs (e.g. 20 puts SPO past its target: negative coefficients);
    `update=False` leaves out the actual-update views (NaN / Case 0, as a version-2 trace reads)."""
    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    probes = _probe_set(n_probes, names)
    encoded = _encoded(rng, probes, names)
    n, r, dim = n_probes, len(names), 6
    lengths = np.array([[len(x) for x in e.response_ids] for e in encoded])
    t_max = int(lengths.max())
    loss_fn = ms.losses.get(loss)
    logp = -lengths * rng.uniform(1.0, 3.0, (n, r))
    ref = logp.copy()
    ref[:, 0] -= ref_offset
    base = rng.normal(size=(n, dim))
    records, previous = [], None
    for s, step in enumerate(steps):
        # The rejected gradient drifts towards the chosen one: the cosine rises over steps.
        a = np.stack([base + 0.3 * rng.normal(size=(n, dim)),
                      (0.2 + 0.15 * s) * base + rng.normal(size=(n, dim)),
                      *[rng.normal(size=(n, dim)) for _ in names[2:]]], axis=1)
        gram = np.einsum("nid,njd->nij", a, a)
        if no_gram:
            gram[:] = np.nan
        d_w, d_l = ms.dynamics.coefficients(loss_fn, logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1],
                                            lengths[:, 0], lengths[:, 1])
        if nan and s == len(steps) - 1:
            logp[0] = np.nan
            gram[0, 0, 1] = gram[0, 1, 0] = np.inf
        case = ms.dynamics.classify(gram, d_w, d_l)
        predicted = ms.dynamics.predict_delta(gram, d_w, d_l)
        observed = np.full((n, r), np.nan) if previous is None else logp - previous
        views = _update_views(rng, observed, lengths, t_max, s, steps) if update else {}
        token_logp = np.full((n, r, t_max), np.nan)
        topk_ids = np.full((n, r, t_max, top_k), -1, dtype=np.int32)
        topk_prob = np.full((n, r, t_max, top_k), np.nan, dtype=np.float32)
        for i, e in enumerate(encoded):
            for j, ids in enumerate(e.response_ids):
                t = len(ids)
                token_logp[i, j, :t] = logp[i, j] / t
                topk_ids[i, j, :t] = rng.integers(3, 40, (t, top_k))  # a small pool: tokens recur
                topk_ids[i, j, :t, 0] = ids  # the target is the argmax, as after SFT
                topk_prob[i, j, :t] = np.sort(rng.dirichlet(np.ones(top_k + 2), t)[:, :top_k], axis=1)[:, ::-1]
        token_gram = {}
        for i in per_token:
            t_w, t_l = lengths[i, 0], lengths[i, 1]
            h_w, h_l = rng.normal(size=(t_w, 4)), rng.normal(size=(t_l, 4))
            h_l[1:] = h_w[1:] + 0.3 * rng.normal(size=(t_l - 1, 4))  # the shared suffix aligns
            token_gram[i] = (h_w @ h_l.T, (h_w ** 2).sum(1), (h_l ** 2).sum(1))
        records.append(Record(step=int(step), logp=logp.copy(), token_logp=token_logp, gram=gram, d_w=d_w, d_l=d_l,
                              case=case, predicted_delta=predicted, observed_delta=observed, topk_ids=topk_ids,
                              topk_prob=topk_prob, token_gram=token_gram, **views))
        previous = logp.copy()
        # Next state: a first-order step with a small effective learning rate, plus noise.
        logp = logp + 0.02 * np.nan_to_num(predicted) + 0.05 * rng.normal(size=(n, r))
    metadata = {"kind": "tracker", "loss": loss, "loss_hparams": loss_fn.hparams, "model": "synthetic",
                "every": int(steps[1] - steps[0]) if len(steps) > 1 else 1, "per_token": "head" if per_token else None,
                "step_split": "AdamW" if update else "unavailable: no optimizer given"}
    path = write_trace(path, probes=probes, encoded=encoded, names=list(names), metadata=metadata, records=records,
                       ref_logp=ref, top_k=top_k)
    if inrun and len(steps):
        _append_inrun(path, probes, list(names), loss_fn, [int(x) for x in steps], top_k, rng, attributed=update)
    return Path(path)


def _update_views(rng: np.random.Generator, observed: np.ndarray, lengths: np.ndarray, t_max: int, s: int,
                  steps: Sequence[int]) -> dict[str, np.ndarray]:
    """The actual-update views of one record whose observed change is `observed` [N, R] (NaN at the
    first record): actual_delta = observed − a curvature share (≈ 5%), split over the tokens by random
    weights; the last of the interval's steps carries 1/k of it (k steps per interval), split into
    parts that sum to step_delta exactly; Cases from the signs."""
    n, r = observed.shape
    actual = observed * (1 + 0.05 * rng.normal(size=(n, r))) + 0.005 * rng.normal(size=(n, r))
    token = np.full((n, r, t_max), np.nan)
    for i in range(n):
        for j in range(r):
            weights = rng.dirichlet(np.ones(lengths[i, j]))
            token[i, j, :lengths[i, j]] = actual[i, j] * weights
    k = max(int(steps[s] - steps[s - 1]), 1) if s else 1
    last = actual / k
    parts = np.stack([last * rng.uniform(0.8, 1.2, (n, r)), 0.3 * last * rng.normal(size=(n, r)),
                      -0.02 * np.abs(last) * rng.uniform(size=(n, r)),
                      1e-9 * rng.normal(size=(n, r)) + 0 * last], axis=-1)  # 0 * last: NaN where it is
    assert parts.shape[-1] == len(STEP_PART_NAMES)  # gradient, momentum, weight_decay, residual
    return {"actual_delta": actual, "actual_token_delta": token, "step_delta": parts.sum(-1), "step_parts": parts,
            "case_observed": ms.dynamics.classify_delta(observed), "case_actual": ms.dynamics.classify_delta(actual)}


def _append_inrun(path: Path, probes, names: list[str], loss_fn, steps: list[int], top_k: int,
                  rng: np.random.Generator, attributed: bool) -> None:
    """Three training pairs per step 1..last record, appended to the trace; with `attributed`, the steps of
    the records carry each pair's probe_effect (a pair t0–t4 recurs across steps) and its texts."""
    with ms.trace.TraceWriter.resume(path, probes=probes, names=names, step=steps[-1], top_k=top_k) as w:
        for step in range(1, steps[-1] + 1):
            a_w, a_l = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
            a_l += (0.2 + 0.1 * step) * a_w
            inner, sq_w, sq_l = (a_w * a_l).sum(1), (a_w ** 2).sum(1), (a_l ** 2).sum(1)
            lw, ll = -rng.uniform(2, 6, 3), -rng.uniform(2, 6, 3)
            d_w, d_l = ms.dynamics.coefficients(loss_fn, lw, ll, lw + 0.1, ll - 0.1, np.full(3, 3.0), np.full(3, 3.0))
            gram = np.stack([np.stack([sq_w, inner], 1), np.stack([inner, sq_l], 1)], 1)
            extra = {}
            if attributed and step in steps:
                ids = [f"t{(step + j) % 5}" for j in range(3)]
                extra = dict(probe_effect=rng.normal(size=(3, len(probes), len(names))), effect_scale=np.ones(3),
                             texts={"pair_id": ids, "prompt": [f"Training prompt {i}" for i in ids],
                                    "chosen": [" good"] * 3, "rejected": [" bad"] * 3})
            w.append_inrun(step, inner=inner, sq_w=sq_w, sq_l=sq_l, scale_w=-d_w, scale_l=d_l,
                           case=ms.dynamics.classify(gram, d_w, d_l), logp_w=lw, logp_l=ll, **extra)


EDGE_CASES = {
    "one_record": {"steps": (0,)},
    "nan": {"nan": True},
    "single_probe": {"n_probes": 1},
    "no_per_token": {"per_token": ()},
    "no_inrun": {"inrun": False},
    "no_top": {"names": ("chosen", "rejected")},
    "no_gram": {"no_gram": True, "inrun": False},
    "one_record_bare": {"steps": (0,), "n_probes": 1, "per_token": (), "inrun": False},
    "no_update": {"update": False},
}


TRACKED_PROBES = [
    {"id": "p0", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive. I liked it a lot",
     "rejected": " negative. I liked it a lot", "extra": {"top": " great"}},
    {"id": "p1", "prompt": "The service was terrible. The sentiment is", "chosen": " negative.",
     "rejected": " positive.", "extra": {"top": " bad"}},
    {"id": "p2", "prompt": "The food was", "chosen": " great", "rejected": " cold and bland", "extra": {"top": " fine"}},
]


def tracked_trace(path: str | Path, tokenizer, *, loss: str = "dpo", steps: int = 6, every: int = 2) -> Path:
    """A real trace: a tiny GPT-2 trained with `loss` on the probe pairs under `ms.Tracker` (per-token
    Gram of p0 at the head tier, in-run geometry of every step, the AdamW step before each record
    split) — the recipe of docs/tracking.md."""
    import torch

    from marginscope.demo.tiny import build_model

    torch.manual_seed(0)
    probes = ms.probes.ProbeSet.from_records(TRACKED_PROBES)
    model = build_model("gpt2", tokenizer)
    batch = ms.dynamics.encode(tokenizer, probes)
    p = len(batch)
    loss_fn = ms.losses.get(loss)
    with torch.no_grad():
        ref, _ = ms.dynamics.score_pairs(model, batch)
    lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in batch], dtype=torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with ms.Tracker(model, tokenizer, probes, path=path, loss=loss_fn, every=every, top_k=5, per_token="head",
                    per_token_probes=["p0"], overwrite=True, optimizer=optimizer) as tracker:
        for step in range(1, steps + 1):
            with tracker.in_run(n_pairs=p) as geo:
                logps, _ = ms.dynamics.score_pairs(model, batch)
                geo.watch(logps)
                loss_fn(logps[:p], logps[p:], ref[:p], ref[p:], lengths[:, 0], lengths[:, 1]).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.step(step)
    return Path(path)
