"""Faults seen on a real instruct model (SmolLM2-135M-Instruct) and cases from public bug reports of
preference trainers, each fixed as a kind: damaged traces, incompatible vocabularies, token texts in
the trace, the default device, mixed-precision references and dropout at step 0."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import marginscope as ms
from marginscope import checkpoint
from marginscope.cli import app
from marginscope.compatibility import check_compatible, resolve_device
from marginscope.demo.tiny import build_model, build_tokenizer, save_tiny
from marginscope.plots._data import token_text
from trace_factory import make_trace

runner = CliRunner()
PAIRS = [{"id": "a", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.",
          "rejected": " negative."},
         {"id": "b", "prompt": "The service was terrible. The sentiment is", "chosen": " negative.",
          "rejected": " positive, and it was fine."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "model", arch="gpt2")


def _probes(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


# --- damaged traces ------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97])
def test_inspect_on_a_truncated_trace_fails_within_seconds(tmp_path, fraction):
    full = make_trace(tmp_path / "run.h5", steps=tuple(range(0, 40, 2)))
    data = Path(full).read_bytes()
    cut = tmp_path / "copy.h5"
    cut.write_bytes(data[:int(len(data) * fraction)])  # an interrupted copy
    started = time.perf_counter()
    result = runner.invoke(app, ["inspect", str(cut)])
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and str(cut) in message and "truncated" in message
    with pytest.raises(ms.MarginscopeError, match="truncated trace file"):
        ms.trace.open(cut)


def test_inspect_on_files_that_are_not_traces_fails_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)  # an HDF5 signature, then noise
    started = time.perf_counter()
    result = runner.invoke(app, ["inspect", str(garbage)])
    assert time.perf_counter() - started < 5 and result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and str(garbage) in result.output


# --- model / reference / tokenizer compatibility --------------------------------------------------

def test_measure_with_a_reference_of_another_vocabulary_is_one_line(model_dir, tmp_path):
    small = build_tokenizer(vocab_size=280)
    ref_dir = tmp_path / "ref"
    build_model("gpt2", small).save_pretrained(ref_dir)
    result = runner.invoke(app, ["measure", "--model", str(model_dir), "--probes", str(_probes(tmp_path / "p.jsonl")),
                                 "--ref", str(ref_dir)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert f"{ref_dir} (reference)" in result.output and "280 token rows" in result.output


def test_check_compatible_names_special_ids_and_output_sizes(tokenizer):
    model = build_model("gpt2", tokenizer)
    check_compatible(model, tokenizer, copy.deepcopy(model))
    wider = build_model("llama", tokenizer)
    wider.resize_token_embeddings(len(tokenizer) + 64)
    with pytest.raises(ms.MarginscopeError, match=f"scores {len(tokenizer) + 64} tokens and model {len(tokenizer)}"):
        check_compatible(model, tokenizer, wider)
    enc = ms.dynamics.encode(tokenizer, ms.probes.ProbeSet.from_records(PAIRS))
    bad = [ms.dynamics.EncodedProbe("x", (1, 5000), ((3,), (4,)))]
    check_compatible(model, tokenizer, encoded=enc)
    with pytest.raises(ms.MarginscopeError, match="a probe token id \\(5000\\) is outside"):
        check_compatible(model, tokenizer, encoded=bad)


# --- token texts in the trace ---------------------------------------------------------------------

def test_trace_holds_every_token_text_and_figures_show_words_without_a_tokenizer(model_dir, tmp_path):
    out = tmp_path / "m.h5"
    result = runner.invoke(app, ["measure", "--model", str(model_dir), "--probes", str(_probes(tmp_path / "p.jsonl")),
                                 "-o", str(out), "--per-token", "head"])
    assert result.exit_code == 0, result.output
    tok = ms.loading.load_tokenizer(model_dir)
    with ms.trace.open(out) as tr:
        assert len(tr.vocab_text) == len(tok)
        ids = tr.input_ids(0, 0)[1]
        assert tr.token_text(ids) == [tok.decode([i]) for i in ids]
        assert "".join(tr.token_text(ids)) == " positive.<|eos|>"
    def labels(fig):
        return [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    offline, with_tokenizer = labels(ms.plots.token_heatmap(out, probe="a")), labels(
        ms.plots.token_heatmap(out, probe="a", tokenizer=tok))
    assert offline == with_tokenizer and {token_text(i, tok) for i in ids} <= set(offline)
    assert not {str(i) for i in ids} & set(offline)  # words, not ids


# --- the default device ---------------------------------------------------------------------------

def test_device_defaults_to_auto_and_keeps_explicit_choices(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    seen = []

    def fake_load(path, *, dtype="auto", device="cpu"):
        seen.append(device)
        raise ms.MarginscopeError("stop here")
    monkeypatch.setattr(checkpoint, "load_model", fake_load)
    probes = str(_probes(tmp_path / "p.jsonl"))
    assert runner.invoke(app, ["measure", "--model", str(model_dir), "--probes", probes]).exit_code == 2
    assert runner.invoke(app, ["measure", "--model", str(model_dir), "--probes", probes,
                               "--device", "cpu"]).exit_code == 2
    assert seen == ["cuda", "cpu"]


# --- mixed precision and dropout at step 0 -------------------------------------------------------

def test_bf16_policy_with_fp32_reference_warns_and_records_the_noise_floor(tokenizer, tmp_path, caplog):
    ref = build_model("llama", tokenizer, seed=4)
    policy = copy.deepcopy(ref).to(torch.bfloat16)
    probes = ms.probes.ProbeSet.from_records(PAIRS)
    with caplog.at_level(logging.WARNING, logger="marginscope"):
        ms.Tracker(policy, tokenizer, probes, tmp_path / "run.h5", loss="dpo", ref_model=ref, top_k=1,
                   convention="separate").close()
    with ms.trace.open(tmp_path / "run.h5") as tr:
        reward = np.abs(tr.logp[0] - tr.ref_logp)
        floor = tr.metadata["reference_noise_floor"]
    assert reward.max() > 1e-5  # the same weights, rounded to bf16: the step-0 reward is not 0
    assert floor == pytest.approx(reward.max())
    assert any("reference_noise_floor" in r.getMessage() and "bfloat16" in r.getMessage() for r in caplog.records)


def test_dropout_model_in_train_mode_is_scored_in_eval_mode(tokenizer, tmp_path):
    model = build_model("gpt2", tokenizer, dropout=0.5).train()
    ref = copy.deepcopy(model)
    probes = ms.probes.ProbeSet.from_records(PAIRS)
    with ms.Tracker(model, tokenizer, probes, tmp_path / "run.h5", loss="dpo", ref_model=ref, every=1,
                    top_k=1) as tracker:
        tracker.step(1)  # no training in between: the same parameters
    assert model.training
    with ms.trace.open(tmp_path / "run.h5") as tr:
        np.testing.assert_array_equal(tr.logp[0], tr.ref_logp)  # step-0 reward and margin exactly 0
        np.testing.assert_array_equal(tr.logp[1], tr.logp[0])
        assert tr.metadata["reference_noise_floor"] is None
        step0 = tr.logp[0]
    np.testing.assert_allclose(ms.dynamics.measure(model.eval(), tokenizer, probes).logp, step0, rtol=1e-6)
