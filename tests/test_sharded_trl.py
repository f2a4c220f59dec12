"""TRL's DPOTrainer (`InRunDPOTrainer` + `TRLCallback`) on a policy sharded by accelerate's FSDP2 plugin,
2 processes under torchrun with gloo on the CPU, against one process without FSDP on the same data.

accelerate enables FSDP only on accelerators; the launcher (tests/scripts/sharded_trl_run.py) puts a
CPU run into accelerate's FSDP branch with a test-only shim (`cpu_fsdp_shim`), and everything after it
is accelerate's, TRL's and FSDP2's own code.

Tolerance: the trace's float64 measurements are exact (step 0, and the in-run rows of step 1, which
use the same parameters, are equal to the last bit), but TRL's fused log-prob kernel keeps its
logsumexp in float32 even for a float64 model (trl/kernels/chunked_logprob.py), so from step 2 on the
two runs train on gradients that differ at float32 rounding (FSDP's reduce-scatter sums the ranks'
halves in another order, which the kernel's float32 rounding turns into ~1e-7 relative). Plain SGD
keeps every field within ~6e-7 of its scale (measured; Adam's first steps would turn the difference
into lr-sized steps on the coordinates whose gradient is at rounding level); fields are compared at
1e-6 of their own scale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import marginscope as ms  # noqa: E402
from marginscope.integrations.trl_inrun import InRunMixin  # noqa: E402
from launch import run_script  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "sharded_trl_run.py"
COMPARED = ("llama", "gpt2")  # gpt2: tied embedding and head
RTOL = 1e-6  # of each field's scale (see the module doc)
FIELDS = ("logp", "token_logp", "gram", "d_w", "d_l", "predicted_delta", "observed_delta", "actual_delta",
          "actual_token_delta", "step_delta")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(one process, two FSDP2 processes) folders of traces, final parameters and run facts."""
    root = tmp_path_factory.mktemp("sharded_trl")
    for folder, runs, nproc in ((root / "one", COMPARED, 1), (root / "two", (*COMPARED, "llama+notracker", "llama+fail"), 2)):
        folder.mkdir()
        run_script(SCRIPT, "--out", str(folder), *runs, nproc=nproc)
    return root / "one", root / "two"


def _close(actual, expected, what: str, rtol: float = RTOL) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    scale = np.nanmax(np.abs(expected)) if np.isfinite(expected).any() else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-15, err_msg=what)


def _facts(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.parametrize("name", COMPARED)
def test_accelerate_really_sharded_the_policy_and_the_reference(runs, name):
    one, two = runs
    for rank in _facts(two, name):
        assert rank["distributed_type"] == "DistributedType.FSDP" and rank["is_fsdp2"]
        assert rank["dtensor_params"] and rank["ref_sharded"] and not rank["inrun_disabled"]
    [alone] = _facts(one, name)
    assert not alone["dtensor_params"] and not alone["is_fsdp2"]


@pytest.mark.parametrize("name", COMPARED)
def test_trl_fsdp2_trace_equals_one_process(runs, name):
    one, two = runs
    with ms.trace.open(one / f"{name}.h5") as a, ms.trace.open(two / f"{name}.h5") as b:
        assert b.metadata["world_size"] == 2 and a.metadata["world_size"] == 1
        np.testing.assert_array_equal(b.steps, [0, 1, 2, 3])
        np.testing.assert_array_equal(a.steps, b.steps)
        np.testing.assert_array_equal(b.logp[0], a.logp[0])  # the same initial model, measured in float64
        np.testing.assert_array_equal(b.gram[0], a.gram[0])
        for field in FIELDS:
            _close(getattr(b, field), getattr(a, field), field)
        assert np.isfinite(b.actual_delta[1:]).all() and np.isfinite(b.step_parts["gradient"][1:]).all()
        assert np.abs(b.logp[-1] - b.logp[0]).max() > 1e-2  # training moved the probes
        for part, values in b.step_parts.items():
            _close(values, a.step_parts[part], part)
        _close(b.token_gram(1)["gram"], a.token_gram(1)["gram"], "token_gram")
        np.testing.assert_array_equal(b.case, a.case)
        np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
        x, y = a.inrun(), b.inrun()
        np.testing.assert_array_equal(np.sort(y["step"]), [1] * 4 + [2] * 4 + [3] * 4)
        assert set(y["rank"].tolist()) == {0, 1}
        # rank r trains on pairs 2r, 2r+1 of each step's 4: (step, rank, pair) is one process's (step, pair)
        order, ref = np.lexsort((y["pair"], y["rank"], y["step"])), np.lexsort((x["pair"], x["step"]))
        first = x["step"][ref] == 1
        for field in ("inner", "sq_w", "sq_l", "logp_w", "logp_l", "scale_w", "scale_l"):
            # each rank's loss is the mean over its own 2 pairs: ∂loss/∂log π is twice one process's
            got = y[field][order] / (2 if field.startswith("scale") else 1)
            _close(got, x[field][ref], f"in-run {field}")
            _close(got[first], x[field][ref][first], f"in-run {field} at step 1", rtol=1e-12)
        assert np.isfinite(y["inner"]).all() and (y["sq_w"] > 0).all() and (y["scale_w"] < 0).all()
        np.testing.assert_array_equal(y["case"][order], x["case"][ref])
    p, q = torch.load(one / f"{name}.pt"), torch.load(two / f"{name}.pt")
    assert p.keys() == q.keys()
    for key in p:
        torch.testing.assert_close(q[key], p[key], rtol=1e-6, atol=1e-6 * float(p[key].abs().max()))


def test_the_tracker_leaves_trl_fsdp2_training_bit_identical(runs):
    _, two = runs
    with_it, without = torch.load(two / "llama.pt"), torch.load(two / "llama+notracker.pt")
    assert all(torch.equal(with_it[k], without[k]) for k in without)


def test_an_inrun_failure_on_one_rank_switches_it_off_on_every_rank(runs):
    """The in-run geometry raises on rank 1 at step 2: step 1's rows of both ranks stay, no rank writes
    rows from step 2 on, the records go on and training is unchanged."""
    _, two = runs
    with ms.trace.open(two / "llama+fail.h5") as tr:
        inrun = tr.inrun()
        np.testing.assert_array_equal(inrun["step"], [1] * 4)
        assert set(inrun["rank"].tolist()) == {0, 1}
        np.testing.assert_array_equal(tr.steps, [0, 1, 2, 3])
        assert np.isfinite(tr.gram).all() and np.isfinite(tr.actual_delta[1:]).all()
    assert [rank["inrun_disabled"] for rank in _facts(two, "llama+fail")] == [False, True]
    trained, plain = torch.load(two / "llama+fail.pt"), torch.load(two / "llama+notracker.pt")
    assert all(torch.equal(trained[k], plain[k]) for k in plain)


class _Accelerator:
    def __init__(self, fsdp2: bool, zero_stage: int = 0) -> None:
        self.is_fsdp2 = fsdp2
        self.state = type("State", (), {"deepspeed_plugin": type("DS", (), {"zero_stage": zero_stage})()
                                        if zero_stage else None})()


@pytest.mark.parametrize("fsdp, fsdp2, zero, refused", [
    (True, False, 0, "FSDP1.*fsdp_version: 2"), (False, False, 3, "ZeRO-3.*fsdp_version: 2"),
    (True, True, 0, None), (False, False, 0, None)])
def test_inrun_refuses_fsdp1_and_zero3_in_one_line(fsdp, fsdp2, zero, refused):
    trainer = InRunMixin()
    trainer.is_fsdp_enabled, trainer.accelerator = fsdp, _Accelerator(fsdp2, zero)
    reason = trainer._inrun_refusal()
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and "\n" not in reason
        assert re.search(refused, reason), reason
