"""In-run geometry inside a real trl.DPOTrainer run: exact against per-row autograd oracles, never
changes the run, turns itself off (and training goes on) when something fails."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import TrainerCallback  # noqa: E402

from marginscope.demo.tiny import build_model  # noqa: E402
from marginscope.integrations import trl_inrun  # noqa: E402
from marginscope.integrations.trl_inrun import InRunDPOTrainer, InRunRecorder  # noqa: E402

from oracles import flat_grad, oracle_logp  # noqa: E402

RECORDS = [
    {"prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.", "rejected": " negative, and bad."},
    {"prompt": "Bad", "chosen": " no", "rejected": " yes it is fine"},
    {"prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive."},
    {"prompt": "Good food", "chosen": " yes, great", "rejected": " no"},
    {"prompt": "The service was slow", "chosen": " and rude.", "rejected": " but kind and quick and fine."},
    {"prompt": "I loved it", "chosen": " a lot", "rejected": " not"},
]


def _args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, report_to=[],
              learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
              disable_tqdm=True, bf16=False)
    kw.update(overrides)
    return trl.DPOConfig(**kw)


class _Capturing(InRunDPOTrainer):
    """Keeps every training batch (token ids) to rebuild the oracle."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super().training_step(model, inputs, *args, **kwargs)


class _Snapshot(TrainerCallback):
    """At each delivery (after the backward, before the optimizer step) keeps the trainable parameters:
    the parameters the step's gradients were taken at."""

    def __init__(self, model):
        self.model, self.records = model, []

    def on_inrun_pairs(self, step, pairs, logp_w, logp_l):
        params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.records.append((step, pairs, logp_w, logp_l, params))


def _rows(batch):
    """(prompt ids, completion ids) of every row of a TRL batch ([chosen; rejected], right-padded)."""
    out = []
    for ids, att, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        n = int(att.sum())
        ids, comp = ids[:n].tolist(), comp[:n].tolist()
        first = comp.index(1)
        assert all(comp[first:]), "completion tokens are contiguous up to the end of the row"
        out.append((ids[:first], ids[first:]))
    return out


def _check_against_oracle(trainer, snap, oracle_model, rtol):
    names = [n for n, p in oracle_model.named_parameters() if n in snap.records[0][4]]
    assert len(snap.records) == len(trainer.batches) == 3
    for k, ((step, pairs, logp_w, logp_l, params), batch) in enumerate(zip(snap.records, trainer.batches)):
        assert step == k + 1
        with torch.no_grad():
            for n, p in oracle_model.named_parameters():
                if n in params:
                    p.copy_(params[n])
        rows = _rows(batch)
        n_pairs = len(rows) // 2
        grads = torch.stack([flat_grad(oracle_model, names, prompt, resp) for prompt, resp in rows])
        gw, gl = grads[:n_pairs], grads[n_pairs:]
        inner, sq_w, sq_l = (gw * gl).sum(1).numpy(), (gw * gw).sum(1).numpy(), (gl * gl).sum(1).numpy()
        np.testing.assert_allclose(pairs.sq_w, sq_w, rtol=rtol)
        np.testing.assert_allclose(pairs.sq_l, sq_l, rtol=rtol)
        # the inner product may be small against the norms: compare at the norms' scale
        np.testing.assert_allclose(pairs.inner, inner, rtol=0, atol=rtol * np.sqrt(sq_w * sq_l).max())
        assert np.all(pairs.scale_w < 0) and np.all(pairs.scale_l > 0)  # DPO pushes chosen up, rejected down
        logps = [oracle_logp(oracle_model, prompt, resp) for prompt, resp in rows]
        np.testing.assert_allclose(logp_w, logps[:n_pairs], rtol=1e-5)
        np.testing.assert_allclose(logp_l, logps[n_pairs:], rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_inrun_equals_per_pair_oracle_full_finetune(tokenizer, tmp_path, arch):
    model = build_model(arch, tokenizer, dtype=torch.float64)
    snap = _Snapshot(model)
    trainer = _Capturing(model=model, ref_model=build_model(arch, tokenizer, dtype=torch.float64),
                         args=_args(tmp_path), train_dataset=datasets.Dataset.from_list(RECORDS),
                         processing_class=tokenizer, callbacks=[snap])
    trainer.batches = []
    assert trainer.args.gradient_checkpointing  # TRL's default: the hooks see recomputed forwards
    trainer.train()
    assert not trainer._inrun_disabled
    _check_against_oracle(trainer, snap, build_model(arch, tokenizer, dtype=torch.float64), rtol=1e-6)


def test_inrun_equals_per_pair_oracle_lora(tokenizer, tmp_path):
    """LoRA adapters are the scope; the (frozen) head is out of it and only the scale is read off TRL's
    token log-probs. Gradient checkpointing on (TRL then makes the embedding outputs require grad)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # B ≠ 0 from the start: gradients reach A too
    torch.manual_seed(0)
    model = peft.get_peft_model(build_model("llama", tokenizer, dtype=torch.float64), config)
    snap = _Snapshot(model)
    trainer = _Capturing(model=model, args=_args(tmp_path), train_dataset=datasets.Dataset.from_list(RECORDS),
                         processing_class=tokenizer, callbacks=[snap])
    trainer.batches = []
    trainer.train()
    assert not trainer._inrun_disabled
    oracle = peft.get_peft_model(build_model("llama", tokenizer, dtype=torch.float64), config)
    assert set(snap.records[0][4]) == {n for n, p in oracle.named_parameters() if p.requires_grad}
    _check_against_oracle(trainer, snap, oracle, rtol=1e-6)


def test_gradient_accumulation_delivers_every_micro_batch_with_its_step(tokenizer, tmp_path):
    model = build_model("llama", tokenizer, dtype=torch.float64)
    snap = _Snapshot(model)
    trainer = _Capturing(model=model, ref_model=build_model("llama", tokenizer, dtype=torch.float64),
                         args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=2,
                                    per_device_train_batch_size=1),
                         train_dataset=datasets.Dataset.from_list(RECORDS[:4]), processing_class=tokenizer,
                         callbacks=[snap])
    trainer.batches = []
    trainer.train()
    assert [r[0] for r in snap.records] == [1, 1, 2, 2]
    # both micro-batches of a step are exact at that step's parameters (the oracle helper numbers 1..3)
    trainer.batches, snap.records = trainer.batches[1:], [(k + 1, *r[1:]) for k, r in enumerate(snap.records[1:])]
    _check_against_oracle(trainer, snap, build_model("llama", tokenizer, dtype=torch.float64), rtol=1e-6)


def test_ld_alpha_rows_with_down_weighted_tails_are_nan(tokenizer, tmp_path):
    """ld_alpha weights the tokens past the shorter response of a pair by alpha: that row's gradient is
    not a scaled ∇log π (NaN); the other row is exact."""
    model = build_model("gpt2", tokenizer, dtype=torch.float64)
    snap = _Snapshot(model)
    trainer = _Capturing(model=model, ref_model=build_model("gpt2", tokenizer, dtype=torch.float64),
                         args=_args(tmp_path, ld_alpha=0.5, max_steps=1, per_device_train_batch_size=3),
                         train_dataset=datasets.Dataset.from_list(RECORDS), processing_class=tokenizer,
                         callbacks=[snap])
    trainer.batches = []
    trainer.train()
    (_, pairs, _, _, params), = snap.records
    rows = _rows(trainer.batches[0])
    lengths = np.array([len(r) for _, r in rows])
    len_w, len_l = lengths[:3], lengths[3:]
    assert (len_w != len_l).any()
    np.testing.assert_array_equal(np.isnan(pairs.sq_w), len_w > len_l)
    np.testing.assert_array_equal(np.isnan(pairs.sq_l), len_l > len_w)
    np.testing.assert_array_equal(np.isnan(pairs.inner), len_w != len_l)
    oracle = build_model("gpt2", tokenizer, dtype=torch.float64)
    names = [n for n, _ in oracle.named_parameters()]
    for i in np.flatnonzero(len_w <= len_l):
        g = flat_grad(oracle, names, *rows[i])
        np.testing.assert_allclose(pairs.sq_w[i], float(g @ g), rtol=1e-6)


def _train(tokenizer, tmp_path, trainer_cls, arch="gpt2", callbacks=(), **overrides):
    """3 steps from the same seed, dropout on (RNG use would show), TRL's defaults otherwise (bf16
    autocast, gradient checkpointing); returns the trainer and its final parameters."""
    torch.manual_seed(0)
    model = build_model(arch, tokenizer, dtype=torch.float32, dropout=0.1)
    ref = build_model(arch, tokenizer, dtype=torch.float32, dropout=0.1)
    args = _args(tmp_path, bf16=True, disable_dropout=False, **overrides)
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(RECORDS),
                          processing_class=tokenizer, callbacks=list(callbacks))
    trainer.train()
    return trainer, [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


_PLAIN: dict = {}


def _plain(tokenizer, tmp_path, arch):
    if arch not in _PLAIN:
        _PLAIN[arch] = _train(tokenizer, tmp_path / "plain", trl.DPOTrainer, arch)[1:]
    return _PLAIN[arch]


def _assert_same_run(plain, hooked, model):
    (params_a, rng_a), (params_b, rng_b) = plain, hooked
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)
    assert torch.equal(rng_a, rng_b)
    for module in model.modules():  # transformers keeps its own hooks (enable_input_require_grads)
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            fn = getattr(getattr(hook, "func", hook), "__func__", getattr(hook, "func", hook))
            assert not getattr(fn, "__module__", "").startswith("marginscope"), hook


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_is_bit_identical_with_inrun_geometry(tokenizer, tmp_path, arch):
    recorder = InRunRecorder()
    trainer, *hooked = _train(tokenizer, tmp_path / "inrun", InRunDPOTrainer, arch, callbacks=[recorder])
    assert not trainer._inrun_disabled
    assert [r.step for r in recorder.records] == [1, 2, 3]
    for r in recorder.records:  # bf16 autocast run: the geometry is the run's own, finite and sane
        assert np.isfinite(r.pairs.cosine).all() and (np.abs(r.pairs.cosine) <= 1 + 1e-6).all()
        assert r.logp_w.dtype == np.float64 and r.logp_w.shape == (2,) and (r.logp_w < 0).all()
    _assert_same_run(_plain(tokenizer, tmp_path, arch), hooked, trainer.model)


@pytest.mark.parametrize("where", ["forward", "backward", "setup"])
def test_failing_geometry_logs_once_and_training_is_unchanged(tokenizer, tmp_path, monkeypatch, caplog, where):
    def boom(*args, **kwargs):
        raise RuntimeError(f"boom in the {where}")

    target = {"forward": (trl_inrun.InRunGeometry, "watch_tokens"),
              "backward": (trl_inrun.InRunGeometry, "_token_scale"),
              "setup": (trl_inrun, "fused_head_settings")}[where]
    monkeypatch.setattr(*target, boom)
    recorder = InRunRecorder()
    with caplog.at_level(logging.WARNING, logger="marginscope"):
        trainer, *hooked = _train(tokenizer, tmp_path / "inrun", InRunDPOTrainer, callbacks=[recorder])
    logged = [r for r in caplog.records if r.name == "marginscope"]
    assert len(logged) == 1 and f"boom in the {where}" in logged[0].getMessage()
    assert trainer._inrun_disabled and recorder.records == []
    assert trainer.state.global_step == 3
    _assert_same_run(_plain(tokenizer, tmp_path, "gpt2"), hooked, trainer.model)


def test_nothing_is_hooked_without_a_listener(tokenizer, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the in-run geometry was set up without a listener")

    monkeypatch.setattr(trl_inrun, "_Step", never)
    trainer, *hooked = _train(tokenizer, tmp_path / "inrun", InRunDPOTrainer)
    assert not trainer._inrun_disabled
    _assert_same_run(_plain(tokenizer, tmp_path, "gpt2"), hooked, trainer.model)
