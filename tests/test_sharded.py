"""The tracker on FSDP2-sharded models (`fully_shard` per block and at the root) under torchrun with gloo
on the CPU: the same trace as one process, the same training with and without it, failures on one
rank switched off on every rank; what is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.errors import MarginscopeError
from marginscope.integrations.fsdp import check_supported
from launch import run_script

SCRIPT = Path(__file__).parent / "scripts" / "sharded_run.py"
COMPARED = ("llama", "llama+ac", "gpt2", "gpt2+ac")
RTOL = 1e-6  # float64 models: the sharded run differs from one process by rounding (~1e-14) only
FIELDS = ("logp", "token_logp", "gram", "d_w", "d_l", "predicted_delta", "observed_delta", "actual_delta",
          "actual_token_delta", "step_delta")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(one process, two FSDP2 processes) folders of traces and final parameters."""
    root = tmp_path_factory.mktemp("sharded")
    for folder, runs, nproc in ((root / "one", COMPARED, 1),
                                (root / "two", (*COMPARED, "llama+notracker", "llama+fail", "llama+mp"), 2)):
        folder.mkdir()
        run_script(SCRIPT, "--out", str(folder), *runs, nproc=nproc)
    return root / "one", root / "two"


def _close(actual, expected, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-12, err_msg=what)


@pytest.mark.parametrize("name", COMPARED)
def test_sharded_trace_equals_one_process(runs, name):
    one, two = runs
    with ms.trace.open(one / f"{name}.h5") as a, ms.trace.open(two / f"{name}.h5") as b:
        assert b.metadata["world_size"] == 2 and a.metadata["world_size"] == 1
        np.testing.assert_array_equal(a.steps, b.steps)
        for field in FIELDS:
            _close(getattr(b, field), getattr(a, field), field)
        assert np.isfinite(b.actual_delta[1:]).all() and np.isfinite(b.step_parts["gradient"][1:]).all()
        for part, values in b.step_parts.items():
            _close(values, a.step_parts[part], part)
        _close(b.token_gram(1)["gram"], a.token_gram(1)["gram"], "token_gram")
        np.testing.assert_array_equal(b.case, a.case)
        np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
        x, y = a.inrun(), b.inrun()
        assert set(y["rank"].tolist()) == {0, 1}
        # rank 0 trains on the first half of the pairs: (step, rank, pair) is one process's (step, pair)
        order, ref = np.lexsort((y["pair"], y["rank"], y["step"])), np.lexsort((x["pair"], x["step"]))
        for field in ("inner", "sq_w", "sq_l", "logp_w", "logp_l"):
            _close(y[field][order], x[field][ref], f"in-run {field}")
        # each rank's loss is the mean over its own half of the pairs: ∂loss/∂log π is twice one process's
        _close(y["scale_w"][order] / 2, x["scale_w"][ref], "in-run scale_w")
        np.testing.assert_array_equal(y["case"][order], x["case"][ref])
    p, q = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
    for key in p:
        torch.testing.assert_close(q[key], p[key], rtol=1e-9, atol=1e-12)


def test_the_tracker_leaves_sharded_training_bit_identical(runs):
    _, two = runs
    with_it, without = torch.load(two / "llama.pt"), torch.load(two / "llama+notracker.pt")
    assert all(torch.equal(with_it[k], without[k]) for k in without)


def test_a_failure_on_one_rank_disables_the_measurement_on_every_rank(runs):
    _, two = runs
    with ms.trace.open(two / "llama+fail.h5") as tr:
        np.testing.assert_array_equal(tr.steps, [0, 1, 2, 3])  # the run and its records went on
        assert np.isfinite(tr.gram[0]).all()
        assert np.isnan(tr.gram[1:]).all()  # rank 1 failed at its second record: off for rank 0's probes too
        assert np.isfinite(tr.logp).all() and np.isfinite(tr.actual_delta[1:]).all()
    trained, plain = torch.load(two / "llama+fail.pt"), torch.load(two / "llama+notracker.pt")
    assert all(torch.equal(trained[k], plain[k]) for k in plain)


def test_mixed_precision_policy_measures_the_compute_dtype(runs):
    one, two = runs
    with ms.trace.open(one / "llama.h5") as a, ms.trace.open(two / "llama+mp.h5") as b:
        for field in ("logp", "gram", "actual_delta", "step_delta"):
            np.testing.assert_allclose(getattr(b, field)[1:], getattr(a, field)[1:], rtol=1e-3, atol=1e-6,
                                       err_msg=field)  # float32 compute against float64
        assert np.isfinite(b.step_parts["gradient"][1:]).all()


def test_zero3_and_fsdp1_are_refused_in_one_line():
    model = torch.nn.Linear(2, 2)
    model.weight.ds_id = 0  # what DeepSpeed ZeRO-3 adds to each partitioned parameter
    with pytest.raises(MarginscopeError, match="ZeRO-3.*fully_shard") as err:
        check_supported(model)
    assert "\n" not in str(err.value)
    fsdp1 = type("FullyShardedDataParallel", (torch.nn.Module,), {})()
    with pytest.raises(MarginscopeError, match="FSDP1.*fully_shard"):
        check_supported(fsdp1)
