"""`marginscope measure` end to end on a saved tiny model, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from marginscope.demo.tiny import save_tiny
from marginscope.loading import load_model, load_tokenizer

runner = CliRunner()
GOOD = [
    {"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.",
     "rejected": " negative.", "extra": {"top": " great"}},
    {"id": "b", "prompt": "The service was terrible. The sentiment is", "chosen": " negative.",
     "rejected": " positive.", "extra": {"top": " bad"}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "model", arch="gpt2")


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_measure_writes_trace_equal_to_library(model_dir, tmp_path):
    probes = _write(tmp_path / "probes.jsonl", GOOD)
    out = tmp_path / "out.h5"
    res = _run("measure", "--model", str(model_dir), "--probes", str(probes), "-o", str(out),
               "--loss", "simpo", "--beta", "2.5", "--hparam", "gamma=0.5")
    assert res.exit_code == 0, res.output
    assert "cos(w,l)" in res.stdout and "a" in res.stdout and f"wrote {out}" in res.stdout
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    geo = ms.dynamics.measure(model, tok, ms.probes.load(probes))
    loss = ms.losses.get("simpo", beta=2.5, gamma=0.5)
    dyn = ms.dynamics.pair_dynamics(geo, loss)
    with ms.trace.open(out) as tr:
        assert tr.names == ["chosen", "rejected", "top"] and tr.probe_ids == ["a", "b"]
        assert tr.steps.tolist() == [0]
        np.testing.assert_allclose(tr.logp[0], geo.logp, rtol=1e-12)
        np.testing.assert_allclose(tr.gram[0], geo.gram, rtol=1e-12)
        np.testing.assert_allclose(tr.d_w[0], dyn.d_w, rtol=1e-12)
        np.testing.assert_array_equal(tr.case[0], dyn.case)
        np.testing.assert_array_equal(tr.input_ids(1, 2)[1], geo.input_ids(1, "top")[1])
        meta = tr.metadata
        assert meta["loss"] == "simpo" and meta["loss_hparams"]["gamma"] == 0.5
        assert meta["scope"] == "trainable" and meta["n_params"] == geo.n_params
        assert set(meta["versions"]) >= {"marginscope", "torch", "transformers"}
        assert tr.schema_version == ms.trace.SCHEMA_VERSION
        assert tr.token_gram(0) is None and np.isnan(tr.observed_delta).all()


def test_measure_with_reference_and_per_token(model_dir, tmp_path):
    ref_dir = save_tiny(tmp_path / "ref", arch="gpt2", seed=1)
    probes = _write(tmp_path / "probes.jsonl", GOOD)
    out = tmp_path / "out.h5"
    res = _run("measure", "-m", str(model_dir), "-p", str(probes), "-o", str(out),
               "--ref", str(ref_dir), "--per-token", "exact", "--params", "all")
    assert res.exit_code == 0, res.output
    ref_logp = ms.dynamics.measure(load_model(ref_dir), load_tokenizer(ref_dir), ms.probes.load(probes)).logp
    with ms.trace.open(out) as tr:
        np.testing.assert_allclose(tr.ref_logp, ref_logp, rtol=1e-6)  # float32 model, other batching
        tg = tr.token_gram(1)
        assert tg["gram"].shape == (1, tr.lengths[1, 0], tr.lengths[1, 1])
        assert tg["step"].tolist() == [0]


def test_console_script_help_and_version():
    exe = Path(sys.executable).with_name("marginscope")
    if not exe.exists():
        pytest.skip("console script not installed (run via `make test`)")
    done = subprocess.run([str(exe), "measure", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Example" in done.stdout
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("marginscope ")


BAD_PROBES = {
    "malformed-json": (['{"id": "a", "prompt": "x", "chosen": "y", "rejected": "z"}', '{"id": "b", "prompt": '], ":2"),
    "missing-field": ([{"id": "a", "prompt": "x", "chosen": "y"}], "rejected"),
    "duplicate-id": ([GOOD[0], {**GOOD[1], "id": "a"}], ":2"),
    "empty-response": ([{**GOOD[0], "chosen": "  "}], "chosen"),
    "mismatched-extra": ([GOOD[0], {**GOOD[1], "extra": {"other": "x"}}], "extra"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROBES))
def test_bad_probe_files_give_one_line_errors(model_dir, tmp_path, case):
    records, where = BAD_PROBES[case]
    probes = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "out.h5"
    res = _run("measure", "--model", str(model_dir), "--probes", str(probes), "-o", str(out))
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(probes) in lines[0] and where in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob("*.h5*"))


def test_model_dir_without_tokenizer(model_dir, tmp_path):
    bare = tmp_path / "bare"
    load_model(model_dir).save_pretrained(bare)
    probes = _write(tmp_path / "probes.jsonl", GOOD)
    out = tmp_path / "out.h5"
    res = _run("measure", "--model", str(bare), "--probes", str(probes), "-o", str(out))
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "no tokenizer" in res.stderr and str(bare) in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--loss", "nope"], "nope"),
    (["--hparam", "beta"], "KEY=VALUE"),
    (["--hparam", "nonsense=1"], "nonsense"),
    (["--engine", "warp"], "engine"),
    (["--params", "matches-nothing"], "selects no parameter"),
    (["--dtype", "float8"], "dtype"),
])
def test_bad_options(model_dir, tmp_path, args, needle):
    probes = _write(tmp_path / "probes.jsonl", GOOD)
    out = tmp_path / "out.h5"
    res = _run("measure", "--model", str(model_dir), "--probes", str(probes), "-o", str(out), *args)
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and needle in res.stderr and "Traceback" not in res.output
    assert not out.exists()


def test_missing_paths(model_dir, tmp_path):
    probes = _write(tmp_path / "probes.jsonl", GOOD)
    res = _run("measure", "--model", str(tmp_path / "nope"), "--probes", str(probes))
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = _run("measure", "--model", str(model_dir), "--probes", str(tmp_path / "none.jsonl"))
    assert res.exit_code == 2 and "none.jsonl" in res.stderr
    res = _run("measure", "--model", str(model_dir), "--probes", str(probes), "-o", str(tmp_path / "no" / "x.h5"))
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_trace_reader_refuses_non_traces(tmp_path):
    bogus = tmp_path / "x.h5"
    bogus.write_text("not hdf5")
    with pytest.raises(ms.MarginscopeError, match="not an HDF5 trace"):
        ms.trace.open(bogus)
    with pytest.raises(ms.MarginscopeError, match="no such trace"):
        ms.trace.open(tmp_path / "missing.h5")
