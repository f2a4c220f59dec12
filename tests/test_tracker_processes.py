"""The tracker across processes: SIGKILL mid-run and resume, and torch.distributed (gloo) runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import marginscope as ms
from launch import ENV, run_script

SCRIPT = Path(__file__).parent / "scripts" / "track_run.py"


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_leaves_every_completed_record_and_the_run_resumes(tmp_path):
    out, ckpt = tmp_path / "run.h5", tmp_path / "ckpt"
    ckpt.mkdir()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--steps", "1000", "--every", "1",
                             "--sleep", "0.3", "--ckpt-dir", str(ckpt)], env=ENV, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: out.exists(), 120, "the trace to appear")
        reader = ms.trace.open(out)  # opened while the run writes
        seen = []
        while len(seen) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            count = len(reader.steps)
            if not seen or count != seen[-1]:
                seen.append(count)
            time.sleep(0.05)
        live = reader.logp
        reader.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen == sorted(seen) and seen[-1] > seen[0]  # the reader saw records as they came
    with ms.trace.open(out) as tr:
        steps = tr.steps
        assert len(steps) >= seen[-1]
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        np.testing.assert_array_equal(tr.logp[:len(live)], live)
        assert np.isfinite(tr.logp).all() and np.isfinite(tr.gram).all()
        last = int(steps[-1])
    assert (ckpt / f"step{last}.pt").exists()
    run_script(SCRIPT, "--out", str(out), "--steps", str(last + 3), "--every", "1", "--ckpt-dir", str(ckpt),
               "--resume-from", str(last), timeout=240)
    with ms.trace.open(out) as tr:
        np.testing.assert_array_equal(tr.steps, np.arange(last + 4))
        assert tr.inrun()["step"].max() == last + 3
        assert np.isfinite(tr.observed_delta[1:]).all()


def test_two_gloo_processes_write_the_same_trace_as_one(tmp_path):
    run_script(SCRIPT, "--out", str(tmp_path / "one.h5"), "--steps", "4", "--every", "2", timeout=240)
    run_script(SCRIPT, "--out", str(tmp_path / "two.h5"), "--steps", "4", "--every", "2", nproc=2, timeout=240)
    with ms.trace.open(tmp_path / "one.h5") as one, ms.trace.open(tmp_path / "two.h5") as two:
        np.testing.assert_array_equal(one.steps, two.steps)
        assert two.metadata["world_size"] == 2
        for field in ("logp", "token_logp", "gram", "d_w", "d_l", "predicted_delta", "observed_delta",
                      "actual_delta", "actual_token_delta", "step_delta"):
            np.testing.assert_allclose(getattr(two, field), getattr(one, field), rtol=1e-9, atol=1e-12,
                                       err_msg=field)
        for part, values in two.step_parts.items():
            np.testing.assert_allclose(values, one.step_parts[part], rtol=1e-9, atol=1e-12, err_msg=part)
        assert np.isfinite(two.step_delta[1:]).all() and np.isfinite(two.step_parts["gradient"][1:]).all()
        np.testing.assert_array_equal(two.case, one.case)
        np.testing.assert_array_equal(two.case_actual, one.case_actual)
        np.testing.assert_array_equal(two.topk_ids, one.topk_ids)
        np.testing.assert_allclose(two.token_gram(1)["gram"], one.token_gram(1)["gram"], rtol=1e-9)
        a, b = one.inrun(), two.inrun()
        assert set(b["rank"].tolist()) == {0, 1} and set(a["rank"].tolist()) == {0}
        for step in (1, 2, 3, 4):
            np.testing.assert_allclose(np.sort(b["inner"][b["step"] == step]), np.sort(a["inner"][a["step"] == step]),
                                       rtol=1e-8)
        # per-pair attribution: each pair's share is the same whichever process trained on it; κ = 1/W
        # undoes DDP's gradient average; the shares add up to the gradient part on both
        for step in (2, 4):
            sa, sb = a["step"] == step, b["step"] == step
            order = {pid: k for k, pid in enumerate(b["pair_id"][sb])}
            assert sorted(order) == sorted(a["pair_id"][sa]) == ["a", "b", "c", "d"]
            effect_b = b["probe_effect"][sb][[order[pid] for pid in a["pair_id"][sa]]]
            np.testing.assert_allclose(effect_b, a["probe_effect"][sa], rtol=1e-9, atol=1e-13)
            np.testing.assert_allclose(a["effect_scale"][sa], 1.0, rtol=1e-12)
            np.testing.assert_allclose(b["effect_scale"][sb], 0.5, rtol=1e-12)
            s = list(one.steps).index(step)
            np.testing.assert_allclose(effect_b.sum(0), two.step_parts["gradient"][s], rtol=1e-9, atol=1e-13)
        assert np.isnan(b["probe_effect"][np.isin(b["step"], [1, 3])]).all()


@pytest.mark.parametrize("nproc", [2])
def test_distributed_probe_split_is_balanced(nproc):
    from marginscope.integrations.distributed import my_chunks
    chunks = [my_chunks(7, 2, r, nproc) for r in range(nproc)]
    assert chunks == [[[0, 1], [4, 5]], [[2, 3], [6]]]
    assert sorted(i for c in chunks for chunk in c for i in chunk) == list(range(7))
