"""`marginscope train` end to end on a saved tiny model, resume from a checkpoint, and its one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from marginscope.demo.tiny import save_tiny
from marginscope.loading import load_model

runner = CliRunner()
PAIRS = [
    {"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.",
     "rejected": " negative."},
    {"id": "b", "prompt": "The service was terrible. The sentiment is", "chosen": " negative.",
     "rejected": " positive."},
    {"id": "c", "prompt": "The food was", "chosen": " great", "rejected": " cold and bland", "extra": {"top": " ok"}},
]
PROBES = [{**PAIRS[0], "extra": {"top": " great"}}, {**PAIRS[1], "extra": {"top": " bad"}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "model", arch="gpt2")


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return {"data": _write(tmp_path / "prefs.jsonl", [{k: v for k, v in p.items() if k != "extra"} for p in PAIRS]),
            "probes": _write(tmp_path / "probes.jsonl", PROBES)}


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _train(model_dir: Path, files: dict[str, Path], *args: str):
    base = ["train", "--model", str(model_dir), "--data", str(files["data"]), "--probes", str(files["probes"]),
            "--batch-size", "2", "--lr", "1e-3", "--every", "2"]
    return runner.invoke(app, base + list(args))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def test_train_writes_trace_checkpoints_and_a_summary(model_dir, files, tmp_path):
    trace, out_dir = tmp_path / "run.h5", tmp_path / "out"
    res = _train(model_dir, files, "-o", str(trace), "--out-dir", str(out_dir), "--steps", "4",
                 "--checkpoint-every", "2", "--loss", "simpo", "--beta", "2.5", "--hparam", "gamma=0.5")
    assert res.exit_code == 0, res.output
    assert "final loss" in res.stdout and str(trace) in res.stdout and "checkpoint-4" in res.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out_dir / "checkpoint-4" / "tokenizer.json").exists()
    with ms.trace.open(trace) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4])
        assert tr.metadata["loss"] == "simpo" and tr.metadata["loss_hparams"] == {"beta": 2.5, "gamma": 0.5}
        assert len(tr.inrun()["step"]) == 4 * 2


def test_resume_from_the_latest_checkpoint_continues_exactly(model_dir, files, tmp_path):
    trace, out_dir = tmp_path / "run.h5", tmp_path / "out"
    args = ("-o", str(trace), "--out-dir", str(out_dir), "--steps", "6", "--checkpoint-every", "2",
            "--grad-accum", "2", "--warmup-steps", "1", "--epochs", "10")
    assert _train(model_dir, files, *args).exit_code == 0
    final = _state(out_dir / "checkpoint-6")
    with ms.trace.open(trace) as tr:
        logp, inrun = tr.logp, tr.inrun()
    for step in (4, 6):  # as if the run had been killed after checkpoint-2 was written
        for path in (out_dir / f"checkpoint-{step}").iterdir():
            path.unlink()
        (out_dir / f"checkpoint-{step}").rmdir()
    res = _train(model_dir, files, *args, "--resume")
    assert res.exit_code == 0, res.output
    for name, value in _state(out_dir / "checkpoint-6").items():
        assert torch.equal(value, final[name]), name
    with ms.trace.open(trace) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4, 6])
        np.testing.assert_array_equal(tr.logp, logp)
        np.testing.assert_array_equal(tr.inrun()["inner"], inrun["inner"])


def test_overwrite_replaces_an_existing_trace(model_dir, files, tmp_path):
    trace = tmp_path / "run.h5"
    trace.write_text("old")
    res = _train(model_dir, files, "-o", str(trace), "--steps", "2", "--overwrite")
    assert res.exit_code == 0, res.output
    with ms.trace.open(trace) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2])


def test_help_has_an_example():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "Example" in res.stdout and "--resume" in res.stdout


def _no_tokenizer(model_dir: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "bare"
    load_model(model_dir).save_pretrained(bare)
    return bare


MISTAKES = {
    "missing data file": (lambda m, f, t: ["--data", str(t / "none.jsonl")], "none.jsonl"),
    "malformed data line": (lambda m, f, t: ["--data", str(_write(t / "bad.jsonl", [PAIRS[0], '{"id": "x", "pr']))],
                            "bad.jsonl:2"),
    "unknown loss": (lambda m, f, t: ["--loss", "nope"], "unknown loss 'nope'"),
    "negative every": (lambda m, f, t: ["--every", "-1"], "every must be an integer ≥ 1; got -1"),
    "zero steps": (lambda m, f, t: ["--steps", "0"], "steps must be an integer ≥ 1; got 0"),
    "model without tokenizer": (lambda m, f, t: ["--model", str(_no_tokenizer(m, t))], "no tokenizer"),
    "probes too long": (lambda m, f, t: ["--probes", str(_write(t / "long.jsonl", [
        {**PROBES[0], "id": "long-probe", "prompt": "The movie was wonderful. " * 40}]))],
        "long.jsonl: probe 'long-probe'"),
    "pair too long": (lambda m, f, t: ["--data", str(_write(t / "long.jsonl", [
        {**PAIRS[0], "id": "long-pair", "prompt": "The movie was wonderful. " * 40}]))],
        "long.jsonl: probe 'long-pair'"),
    "unknown hparam": (lambda m, f, t: ["--hparam", "gamma=1"], "loss 'dpo' has no hyper-parameter 'gamma'"),
    "bad hparam": (lambda m, f, t: ["--hparam", "beta"], "KEY=VALUE"),
    "trace folder missing": (lambda m, f, t: ["-o", str(t / "no" / "run.h5")], "does not exist"),
    "nothing to resume": (lambda m, f, t: ["--resume"], "no checkpoint-<step> folder to resume from"),
    "resume twice": (lambda m, f, t: ["--resume", "--resume-from", str(t)], "not both"),
    "fsdp in one process": (lambda m, f, t: ["--fsdp"], "fsdp: launch with torchrun --nproc_per_node N"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_user_mistakes_give_one_line_and_exit_2(model_dir, files, tmp_path, case):
    make_args, needle = MISTAKES[case]
    args = make_args(model_dir, files, tmp_path)
    outputs = ["-o", str(tmp_path / "run.h5"), "--out-dir", str(tmp_path / "out")]
    res = _train(model_dir, files, *outputs, "--steps", "2", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "run.h5").exists() and not (tmp_path / "out").exists()


def test_existing_trace_needs_resume_or_overwrite(model_dir, files, tmp_path):
    trace = tmp_path / "run.h5"
    trace.write_text("an earlier run")
    res = _train(model_dir, files, "-o", str(trace), "--out-dir", str(tmp_path / "out"), "--steps", "2")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "exists" in res.stderr
    assert trace.read_text() == "an earlier run" and not (tmp_path / "out").exists()


def test_two_gloo_processes_train_like_one_with_twice_the_batch(model_dir, tmp_path):
    data = _write(tmp_path / "prefs.jsonl", [{"id": f"p{i}", "prompt": p["prompt"] + " " * (i // 3),
                                              "chosen": p["chosen"], "rejected": p["rejected"]}
                                             for i, p in enumerate(PAIRS * 2)])
    probes = _write(tmp_path / "probes.jsonl", PROBES)

    def args(tag: str, batch_size: int) -> list[str]:
        return ["train", "--model", str(model_dir), "--data", str(data), "--probes", str(probes), "--every", "1",
                "-o", str(tmp_path / f"{tag}.h5"), "--out-dir", str(tmp_path / tag), "--batch-size", str(batch_size),
                "--lr", "1e-3", "--epochs", "1"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                sys.executable, "-c", "from marginscope.cli import main; main()"]
    proc = subprocess.Popen([*torchrun, *args("two", 2)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("final loss") == 1  # the summary comes from the main process only
    assert runner.invoke(app, args("one", 4)).exit_code == 0
    one, two = tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2"  # 6 pairs, 4 a step
    expected = _state(one)
    for name, value in _state(two).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    logs = [torch.load(path / "trainer_state.pt", weights_only=True)["history"] for path in (one, two)]
    assert [h["pairs"] for h in logs[1]] == [4, 2]  # the short last step: process 1 had no pair
    for key in ("loss", "margin", "grad_norm"):  # step 1's margin is 0 up to float32 rounding (another batching)
        np.testing.assert_allclose([h[key] for h in logs[1]], [h[key] for h in logs[0]], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    with ms.trace.open(tmp_path / "one.h5") as a, ms.trace.open(tmp_path / "two.h5") as b:
        np.testing.assert_array_equal(b.steps, [0, 1, 2])
        np.testing.assert_allclose(b.logp, a.logp, rtol=1e-5)
        rows = b.inrun()
        assert sorted(zip(rows["step"], rows["rank"])) == [(1, 0), (1, 0), (1, 1), (1, 1), (2, 0), (2, 0)]
        np.testing.assert_allclose(np.sort(rows["logp_w"][rows["step"] == 1]),
                                   np.sort(a.inrun()["logp_w"][a.inrun()["step"] == 1]), rtol=1e-5)


def test_two_gloo_processes_with_fsdp_train_and_track_like_one(model_dir, tmp_path):
    data = _write(tmp_path / "prefs.jsonl", [{"id": f"p{i}", "prompt": p["prompt"] + " " * (i // 3),
                                              "chosen": p["chosen"], "rejected": p["rejected"]}
                                             for i, p in enumerate(PAIRS * 2)])
    probes = _write(tmp_path / "probes.jsonl", PROBES)

    def args(tag: str, batch_size: int) -> list[str]:
        return ["train", "--model", str(model_dir), "--data", str(data), "--probes", str(probes), "--every", "1",
                "-o", str(tmp_path / f"{tag}.h5"), "--batch-size", str(batch_size), "--lr", "1e-3", "--epochs", "1"]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                sys.executable, "-c", "from marginscope.cli import main; main()"]
    proc = subprocess.Popen([*torchrun, *args("two", 2), "--fsdp"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("final loss") == 1
    assert runner.invoke(app, args("one", 4)).exit_code == 0
    with ms.trace.open(tmp_path / "one.h5") as a, ms.trace.open(tmp_path / "two.h5") as b:
        np.testing.assert_array_equal(b.steps, [0, 1, 2])  # the short last step: process 1 had no pair
        for field in ("logp", "gram", "observed_delta", "actual_delta", "step_delta"):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-4, atol=1e-7, err_msg=field)
        np.testing.assert_allclose(b.step_parts["gradient"], a.step_parts["gradient"], rtol=1e-4, atol=1e-7)
        rows = b.inrun()
        assert sorted(zip(rows["step"], rows["rank"])) == [(1, 0), (1, 0), (1, 1), (1, 1), (2, 0), (2, 0)]
        for field in ("logp_w", "inner"):
            np.testing.assert_allclose(np.sort(rows[field][rows["step"] == 1]),
                                       np.sort(a.inrun()[field][a.inrun()["step"] == 1]), rtol=1e-4, err_msg=field)
