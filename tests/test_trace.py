"""The HDF5 trace: round trip, the xarray view, SWMR reading while a run writes, SIGKILL, resume,
refusals and atomic one-shot writes. Tiny synthetic records (no model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import marginscope as ms
from marginscope.dynamics.scoring import EncodedProbe
from marginscope.probes import ProbeSet
from marginscope.trace import Record, TraceWriter, write_trace

TOP_K = 2
PROBE_RECORDS = [
    {"id": "p0", "prompt": "A", "chosen": " b c", "rejected": " d e f g", "extra": {"top": " h"}},
    {"id": "p1", "prompt": "B", "chosen": " i j k", "rejected": " l", "extra": {"top": " m n"}},
    {"id": "p2", "prompt": "C", "chosen": " o", "rejected": " p q", "extra": {"top": " r s t"}},
]
LENGTHS = np.array([[2, 4, 1], [3, 1, 2], [1, 2, 3]])  # [N, R] response lengths in tokens
N, R, T = LENGTHS.shape[0], LENGTHS.shape[1], int(LENGTHS.max())
TOKEN_GRAM_SHAPES = {0: (2, 4), 2: (1, 2)}
NAMES = ["chosen", "rejected", "top"]
CHILD_TIMEOUT = 60.0


def probes(records=PROBE_RECORDS) -> ProbeSet:
    return ProbeSet.from_records(records)


def encoded() -> list[EncodedProbe]:
    return [EncodedProbe(f"p{i}", (100 + i,), tuple(tuple(range(10 * j, 10 * j + n)) for j, n in enumerate(row)))
            for i, row in enumerate(LENGTHS)]


def make_record(step: int, token_gram: tuple[int, ...] = (0, 2), k: int = TOP_K) -> Record:
    """A deterministic record for `step`, padded like real ones (NaN / −1 beyond each length)."""
    rng = np.random.default_rng(step)
    pad = np.arange(T)[None, None, :] >= LENGTHS[:, :, None]  # [N, R, T]
    token_logp = np.where(pad, np.nan, -rng.random((N, R, T)))
    prob = -np.sort(-rng.random((N, R, T, k)), axis=-1).astype(np.float32)
    topk_ids = np.where(pad[..., None], -1, rng.integers(0, 50, (N, R, T, k))).astype(np.int32)
    grams = {n: (rng.normal(size=TOKEN_GRAM_SHAPES[n]), rng.random(TOKEN_GRAM_SHAPES[n][0]),
                 rng.random(TOKEN_GRAM_SHAPES[n][1])) for n in token_gram}
    return Record(step=step, logp=np.nansum(token_logp, axis=-1), token_logp=token_logp,
                  gram=rng.normal(size=(N, R, R)), d_w=rng.random(N), d_l=rng.random(N),
                  case=rng.integers(1, 5, N).astype(np.int8), predicted_delta=rng.normal(size=(N, R)),
                  observed_delta=rng.normal(size=(N, R)), topk_ids=topk_ids,
                  topk_prob=np.where(pad[..., None], np.nan, prob), token_gram=grams)


def inrun_rows(step: int, p: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return {"inner": rng.normal(size=p), "sq_w": rng.random(p), "sq_l": rng.random(p),
            "scale_w": rng.random(p), "scale_l": rng.random(p), "case": rng.integers(1, 5, p)}


def create(path: Path, **kwargs) -> TraceWriter:
    args = dict(probes=probes(), encoded=encoded(), names=NAMES, metadata={"model": "tiny", "lr": 1e-3},
                ref_logp=np.arange(N * R, dtype=float).reshape(N, R), top_k=TOP_K,
                token_gram_shapes=TOKEN_GRAM_SHAPES)
    return TraceWriter.create(path, **{**args, **kwargs})


def assert_record(tr, i: int, expected: Record) -> None:
    """Record i of trace `tr` equals `expected`, field by field."""
    assert tr.steps[i] == expected.step
    for name in ("logp", "token_logp", "gram", "d_w", "d_l", "case", "predicted_delta", "observed_delta",
                 "topk_ids", "topk_prob"):
        np.testing.assert_array_equal(getattr(tr, name)[i], getattr(expected, name), err_msg=name)


def assert_records(path: Path, steps: list[int]) -> None:
    with ms.trace.open(path) as tr:
        assert tr.steps.tolist() == steps
        for i, step in enumerate(steps):
            assert_record(tr, i, make_record(step))


# ---- round trip ---------------------------------------------------------------------------------

def test_round_trip_every_field(tmp_path):
    path = tmp_path / "run.h5"
    first, second = make_record(0), make_record(5, token_gram=(0,))
    second.d_w[1] = np.nan
    second.gram[2, 0, 1] = np.inf
    with create(path) as w:
        assert w.steps.tolist() == [] and w.last_logp() is None
        w.append(first)
        w.append_inrun(1, **inrun_rows(1), logp_w=[1.0, 2.0, 3.0], logp_l=[4.0, 5.0, 6.0])
        w.append_inrun(2, rank=1, pair_start=3, **inrun_rows(2, p=2), effect_scale=[0.5, 0.5],
                       probe_effect=np.arange(2 * N * R, dtype=float).reshape(2, N, R),
                       texts={"pair_id": ["a", "b"], "prompt": ["x", "y"], "chosen": ["é", ""], "rejected": ["r", "s"]})
        w.append(second)
        assert w.steps.tolist() == [0, 5]
        np.testing.assert_array_equal(w.last_logp(), second.logp)
        np.testing.assert_array_equal(w.ref_logp, np.arange(N * R).reshape(N, R))
    with ms.trace.open(path) as tr:
        assert tr.schema_version == ms.trace.SCHEMA_VERSION == 4
        assert tr.names == NAMES and tr.probe_ids == ["p0", "p1", "p2"] and tr.top_k == TOP_K
        assert tr.fingerprint == probes().fingerprint()
        assert tr.metadata == {"model": "tiny", "lr": 1e-3}
        np.testing.assert_array_equal(tr.lengths, LENGTHS)
        np.testing.assert_array_equal(tr.ref_logp, np.arange(N * R).reshape(N, R))
        np.testing.assert_array_equal(tr.input_ids(2, 2)[0], [102])
        np.testing.assert_array_equal(tr.input_ids(2, 2)[1], [20, 21, 22])
        assert tr.steps.dtype == np.int64 and tr.topk_ids.dtype == np.int32 and tr.topk_prob.dtype == np.float32
        assert tr.logp.shape == (2, N, R) and tr.topk_ids.shape == (2, N, R, T, TOP_K)
        assert_record(tr, 0, first)
        assert_record(tr, 1, second)
        assert tr.nonfinite.tolist() == [[False] * 3, [False, True, True]]
        np.testing.assert_array_equal(tr.argmax_ids, tr.topk_ids[..., 0])
        np.testing.assert_array_equal(tr.argmax_prob, tr.topk_prob[..., 0])
        np.testing.assert_allclose(tr.target_prob, np.exp(tr.token_logp))
        tg0, tg2 = tr.token_gram(0), tr.token_gram(2)
        assert tg0["step"].tolist() == [0, 5] and tg2["step"].tolist() == [0] and tr.token_gram(1) is None
        for name, i in (("gram", 0), ("sqnorm_w", 1), ("sqnorm_l", 2)):
            np.testing.assert_array_equal(tg0[name][1], second.token_gram[0][i])
            np.testing.assert_array_equal(tg2[name][0], first.token_gram[2][i])
        inrun = tr.inrun()
        assert inrun["step"].tolist() == [1, 1, 1, 2, 2] and inrun["rank"].tolist() == [0, 0, 0, 1, 1]
        assert inrun["pair"].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(inrun["inner"], np.r_[inrun_rows(1)["inner"], inrun_rows(2, 2)["inner"]])
        np.testing.assert_array_equal(inrun["case"], np.r_[inrun_rows(1)["case"], inrun_rows(2, 2)["case"]])
        np.testing.assert_array_equal(inrun["logp_w"][:3], [1.0, 2.0, 3.0])
        assert np.isnan(inrun["logp_l"][3:]).all()
        assert inrun["probe_effect"].shape == (5, N, R) and np.isnan(inrun["probe_effect"][:3]).all()
        np.testing.assert_array_equal(inrun["probe_effect"][3:], np.arange(2 * N * R).reshape(2, N, R))
        assert np.isnan(inrun["effect_scale"][:3]).all() and inrun["effect_scale"][3:].tolist() == [0.5, 0.5]
        assert inrun["pair_id"].tolist() == ["", "", "", "a", "b"] and inrun["chosen"].tolist()[3:] == ["é", ""]


def test_explicit_nonfinite_is_kept(tmp_path):
    record = make_record(0)
    record.nonfinite = np.array([True, False, True])
    with create(tmp_path / "run.h5") as w:
        w.append(record)
    with ms.trace.open(tmp_path / "run.h5") as tr:
        assert tr.nonfinite.tolist() == [[True, False, True]]


def test_to_xarray(tmp_path):
    path = tmp_path / "run.h5"
    records = [make_record(0), make_record(3, token_gram=(0,))]
    with create(path) as w:
        for record in records:
            w.append(record)
    with ms.trace.open(path) as tr:
        ds = tr.to_xarray()
    assert dict(ds.sizes) == {"step": 2, "probe": N, "response": R, "response_j": R, "position": T,
                              "k": TOP_K, "part": 4, "token_gram_probe": 2, "position_w": T, "position_l": T}
    assert ds["step"].values.tolist() == [0, 3] and ds["probe"].values.tolist() == ["p0", "p1", "p2"]
    assert ds["response"].values.tolist() == NAMES and ds["token_gram_probe"].values.tolist() == ["p0", "p2"]
    assert ds["topk_prob"].dims == ("step", "probe", "response", "position", "k")
    assert ds["gram"].dims == ("step", "probe", "response", "response_j")
    np.testing.assert_array_equal(ds["gram"].sel(step=3, probe="p1", response="top", response_j="chosen"),
                                  records[1].gram[1, 2, 0])
    np.testing.assert_array_equal(ds["topk_ids"].values[1], records[1].topk_ids)
    np.testing.assert_array_equal(ds["nonfinite"].values, np.zeros((2, N), bool))
    np.testing.assert_array_equal(ds["lengths"].values, LENGTHS)
    np.testing.assert_array_equal(ds["ref_logp"].sel(probe="p2", response="top"), 8.0)
    tg = ds["token_gram"].sel(token_gram_probe="p2")
    np.testing.assert_array_equal(tg.sel(step=0).values[:1, :2], records[0].token_gram[2][0])
    assert np.isnan(tg.sel(step=3)).all() and np.isnan(tg.sel(step=0).values[1:]).all()
    np.testing.assert_array_equal(ds["token_sqnorm_l"].sel(step=3, token_gram_probe="p0").values,
                                  records[1].token_gram[0][2])
    assert '"model": "tiny"' in ds.attrs["metadata"]


# ---- reading while writing -------------------------------------------------------------------------

def test_reader_opened_before_appends_sees_them(tmp_path):
    path = tmp_path / "run.h5"
    with create(path) as w, ms.trace.open(path) as tr:
        assert tr.steps.tolist() == [] and tr.logp.shape == (0, N, R) and tr.inrun()["step"].size == 0
        for i, step in enumerate((0, 2, 4)):
            w.append(make_record(step))
            w.append_inrun(step + 1, **inrun_rows(step))
            assert tr.steps.tolist() == [0, 2, 4][:i + 1]
            assert_record(tr, i, make_record(step))
            assert tr.token_gram(0)["step"].tolist() == [0, 2, 4][:i + 1]
            assert tr.inrun()["step"].size == 3 * (i + 1)
            assert tr.refresh() == i + 1


def _child(path: str, n: int, sleep: float) -> None:
    """Subprocess writer: appends in-run rows and a record for steps 1..n (forever when n < 0),
    printing each step after its append returned."""
    with create(Path(path)) as w:
        step = 1
        while n < 0 or step <= n:
            w.append_inrun(step, **inrun_rows(step))
            w.append(make_record(step))
            print(step, flush=True)
            step += 1
            time.sleep(sleep)


def _spawn(path: Path, n: int, sleep: float) -> subprocess.Popen:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_trace; "
            f"test_trace._child({str(path)!r}, {n}, {sleep})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_file(path: Path, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not path.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "the writer never created the trace"
        time.sleep(0.01)


def test_reader_follows_a_writer_process(tmp_path):
    path, n = tmp_path / "run.h5", 6
    child = _spawn(path, n, sleep=0.3)
    try:
        _wait_for_file(path, child)
        seen: list[int] = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        with ms.trace.open(path) as tr:
            while not seen or seen[-1] < n:
                assert time.monotonic() < deadline, f"saw only {seen}"
                steps = tr.steps  # one read: a record may land between two reads
                count = len(steps)
                if not seen or count != seen[-1]:
                    seen.append(count)
                    assert steps.tolist() == list(range(1, count + 1))
                    if count:
                        assert_record(tr, count - 1, make_record(count))
                time.sleep(0.01)
        assert any(0 < c < n for c in seen), seen  # the reader saw the run mid-way
        assert child.wait(CHILD_TIMEOUT) == 0, child.stderr.read()
    finally:
        child.kill()
        child.wait()
    assert_records(path, list(range(1, n + 1)))


def test_sigkilled_writer_leaves_a_readable_resumable_trace(tmp_path):
    path = tmp_path / "run.h5"
    child = _spawn(path, -1, sleep=0.02)
    try:
        _wait_for_file(path, child)
        deadline = time.monotonic() + CHILD_TIMEOUT
        with ms.trace.open(path) as tr:
            while len(tr.steps) < 3:
                assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
                time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    done = [int(line) for line in child.stdout.read().split()]  # appends that returned before the kill
    with pytest.raises(OSError):  # the file is flagged as open for writing: only SWMR readers get in
        h5py.File(path, "r")
    with ms.trace.open(path) as tr:
        steps = tr.steps.tolist()
        assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))
        assert set(done) <= set(steps) and len(steps) <= len(done) + 1
        inrun_steps = tr.inrun()["step"]
    assert_records(path, steps)
    assert set(inrun_steps) >= set(steps) and (np.diff(inrun_steps) >= 0).all()
    last = steps[-1]
    with TraceWriter.resume(path, probes=probes(), names=NAMES, step=last, top_k=TOP_K) as w:
        assert w.steps.tolist() == steps
        w.append(make_record(last + 1))
        w.append_inrun(last + 2, **inrun_rows(last + 2))
        w.append(make_record(last + 2))
    assert_records(path, list(range(1, last + 3)))
    with ms.trace.open(path) as tr:
        inrun = tr.inrun()
        assert set(inrun["step"]) == set(range(1, last + 1)) | {last + 2}
        np.testing.assert_array_equal(inrun["inner"][-3:], inrun_rows(last + 2)["inner"])
        assert tr.token_gram(2)["step"].tolist() == list(range(1, last + 3))
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]


# ---- resume ------------------------------------------------------------------------------------

def _run_with_gaps(path: Path) -> None:
    """Records at steps 0, 10, 20, 30; two in-run rows at every step 1..30."""
    with create(path) as w:
        for step in range(31):
            if step:
                w.append_inrun(step, **inrun_rows(step, p=2))
            if step % 10 == 0:
                w.append(make_record(step))


@pytest.mark.parametrize("resume_at,kept", [(20, [0, 10, 20]), (25, [0, 10, 20]), (0, [0]), (-1, [])])
def test_resume_drops_rows_past_step(tmp_path, resume_at, kept):
    path = tmp_path / "run.h5"
    _run_with_gaps(path)
    with TraceWriter.resume(path, probes=probes(), names=NAMES, step=resume_at, top_k=TOP_K) as w:
        assert w.steps.tolist() == kept
        np.testing.assert_array_equal(w.ref_logp, np.arange(N * R).reshape(N, R))
        w.append(make_record(30))
        w.append_inrun(31, **inrun_rows(31, p=2))
    assert_records(path, [*kept, 30])
    with ms.trace.open(path) as tr:
        assert tr.token_gram(0)["step"].tolist() == [*kept, 30]
        assert tr.inrun()["step"].tolist() == [s for s in range(1, resume_at + 1) for _ in range(2)] + [31, 31]
        assert tr.metadata == {"model": "tiny", "lr": 1e-3} and tr.probe_ids == ["p0", "p1", "p2"]
        np.testing.assert_array_equal(tr.input_ids(1, 0)[1], [0, 1, 2])


def test_resume_keeps_in_run_rows_of_every_rank(tmp_path):
    """In-run rows come rank after rank, so their steps are not sorted; resume filters, not truncates."""
    path = tmp_path / "run.h5"
    with create(path) as w:
        w.append(make_record(0))
        for rank in (0, 1):
            for step in (1, 2, 3):
                w.append_inrun(step, rank=rank, **inrun_rows(10 * rank + step, p=1))
    with TraceWriter.resume(path, probes=probes(), names=NAMES, step=2, top_k=TOP_K):
        pass
    with ms.trace.open(path) as tr:
        inrun = tr.inrun()
    assert inrun["step"].tolist() == [1, 2, 1, 2] and inrun["rank"].tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(inrun["inner"], [inrun_rows(s, p=1)["inner"][0] for s in (1, 2, 11, 12)])


def test_resume_refuses_another_run(tmp_path):
    path = tmp_path / "run.h5"
    _run_with_gaps(path)
    other = [{**PROBE_RECORDS[0], "prompt": "Z"}, *PROBE_RECORDS[1:]]
    cases = [
        (dict(probes=probes(other)), "another probe set"),
        (dict(names=["chosen", "rejected"]), "response names"),
        (dict(top_k=TOP_K + 1), f"top_k {TOP_K} differs"),
    ]
    for change, needle in cases:
        args = {"probes": probes(), "names": NAMES, "step": 10, "top_k": TOP_K, **change}
        with pytest.raises(ms.MarginscopeError, match=needle) as err:
            TraceWriter.resume(path, **args)
        assert str(path) in str(err.value)
    assert_records(path, [0, 10, 20, 30])  # untouched by the refusals


def test_a_version_3_trace_reads_without_attribution(tmp_path):
    """Traces before version 4 have no per-pair attribution: it reads as NaN and empty texts."""
    import h5py

    path = tmp_path / "v3.h5"
    with create(path) as w:
        w.append(make_record(0))
        w.append_inrun(1, **inrun_rows(1))
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 3
        for name in ("probe_effect", "effect_scale", "pair_id", "prompt", "chosen", "rejected"):
            del f["inrun"][name]
    with ms.trace.open(path) as tr:
        inrun = tr.inrun()
        assert inrun["probe_effect"].shape == (3, N, R) and np.isnan(inrun["probe_effect"]).all()
        assert inrun["prompt"].tolist() == [""] * 3 and inrun["inner"].shape == (3,)


def test_other_schema_versions_and_non_traces_are_refused(tmp_path):
    path = tmp_path / "run.h5"
    _run_with_gaps(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 1
    for action in (lambda: ms.trace.open(path),
                   lambda: TraceWriter.resume(path, probes=probes(), names=NAMES, step=10, top_k=TOP_K)):
        with pytest.raises(ms.MarginscopeError, match="schema version 1.*versions 2, 3") as err:
            action()
        assert str(path) in str(err.value)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ms.MarginscopeError, match="not a marginscope trace"):
        ms.trace.open(plain)
    with pytest.raises(ms.MarginscopeError, match="not a marginscope trace"):
        TraceWriter.resume(plain, probes=probes(), names=NAMES, step=0, top_k=TOP_K)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ms.MarginscopeError, match="not an HDF5 trace"):
        ms.trace.open(tmp_path / "text.h5")
    with pytest.raises(ms.MarginscopeError, match="no such trace"):
        TraceWriter.resume(tmp_path / "missing.h5", probes=probes(), names=NAMES, step=0, top_k=TOP_K)


# ---- refusals while writing ----------------------------------------------------------------------

def test_create_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    path.write_text("old")
    with pytest.raises(ms.MarginscopeError, match=f"{path}: exists"):
        create(path)
    assert path.read_text() == "old"
    with create(path, overwrite=True) as w:
        w.append(make_record(0))
    assert_records(path, [0])


@pytest.mark.parametrize("change,needle", [
    (dict(top_k=0), "top_k must be ≥ 1"),
    (dict(token_gram_shapes={1: (2, 2)}), r"token_gram_shapes\[1\]"),
    (dict(names=["chosen", "top", "rejected"]), "response names"),
    (dict(ref_logp=np.zeros(3)), "ref_logp"),
])
def test_create_refuses_inconsistent_inputs(tmp_path, change, needle):
    with pytest.raises(ms.MarginscopeError, match=needle):
        create(tmp_path / "run.h5", **change)
    assert list(tmp_path.iterdir()) == []


def test_bad_appends_are_refused_and_leave_the_trace_intact(tmp_path):
    path = tmp_path / "run.h5"
    bad_shape = make_record(1)
    bad_shape.topk_prob = bad_shape.topk_prob[..., :1]
    bad_gram = make_record(1)
    bad_gram.token_gram[1] = bad_gram.token_gram[0]
    with create(path) as w:
        w.append(make_record(0))
        with pytest.raises(ms.MarginscopeError, match="topk_prob has shape"):
            w.append(bad_shape)
        with pytest.raises(ms.MarginscopeError, match="probe index 1"):
            w.append(bad_gram)
        with pytest.raises(ms.MarginscopeError, match="not after the last recorded step 0"):
            w.append(make_record(0))
        with pytest.raises(ms.MarginscopeError, match=r"in-run columns \[.sq_w.\] do not have 3 rows"):
            w.append_inrun(1, **{**inrun_rows(1), "sq_w": np.zeros(2)})
        w.append(make_record(1))
    assert_records(path, [0, 1])


def test_write_trace_is_atomic(tmp_path):
    path = tmp_path / "out.h5"
    args = dict(probes=probes(), encoded=encoded(), names=NAMES, metadata={"kind": "measure"}, top_k=TOP_K)
    broken = make_record(1)
    broken.gram = broken.gram[:, :2]
    with pytest.raises(ms.MarginscopeError, match="gram has shape"):
        write_trace(path, records=[make_record(0), broken], **args)
    assert list(tmp_path.iterdir()) == []
    path.write_text("previous")
    with pytest.raises(ms.MarginscopeError):
        write_trace(path, records=[make_record(0), broken], **args)
    assert path.read_text() == "previous" and list(tmp_path.iterdir()) == [path]
    assert write_trace(path, records=[make_record(0)], **args) == path
    assert_records(path, [0])
    with ms.trace.open(path) as tr:
        assert tr.ref_logp is None and tr.token_gram(0)["step"].tolist() == [0] and tr.token_gram(1) is None
    assert list(tmp_path.iterdir()) == [path]
