"""TRLCallback on a real trl.DPOTrainer run and TrackerCallback on the plain HF Trainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import marginscope as ms

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from oracles import flat_grad  # noqa: E402
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments  # noqa: E402


class Snapshots(TrainerCallback):
    """Copies the model's parameters at step 0 and every `every` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.states = every, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = copy.deepcopy(model.state_dict())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.states[state.global_step] = copy.deepcopy(model.state_dict())


def _dpo_trainer(model, tokenizer, probes, tmp_path, steps: int, **config):
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in probes] * 4
    config = {"save_strategy": "no", **config}
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=steps,
                         learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True,
                         seed=0, disable_tqdm=True, disable_dropout=False, **config)
    return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def test_dpo_trainer_trace_equals_measure_at_logged_steps(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2", dtype=torch.float32)
    trainer = _dpo_trainer(model, tokenizer, probes, tmp_path, 12, beta=0.2, loss_type=["sigmoid", "hinge"],
                           loss_weights=[1.0, 0.5])
    path = tmp_path / "run.h5"
    snapshots = Snapshots(3)
    trainer.add_callback(snapshots)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=path, every=3, top_k=2))
    trainer.train()
    assert trainer.args.bf16 and "_original_forward" in trainer.model.__dict__  # trained under bf16 autocast
    loss = ms.losses.trl_loss(["sigmoid", "hinge"], beta=0.2, loss_weights=[1.0, 0.5])
    with ms.trace.open(path) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 3, 6, 9, 12])
        assert tr.metadata["loss_hparams"]["loss_type"] == ["sigmoid", "hinge"]
        ref = None
        for s, step in enumerate(tr.steps):
            m = make_model("gpt2", dtype=torch.float32)
            m.load_state_dict(snapshots.states[int(step)])
            geo = ms.dynamics.measure(m, tokenizer, probes)
            ref = geo.logp if ref is None else ref
            dyn = ms.dynamics.pair_dynamics(geo, loss, ref)
            np.testing.assert_allclose(tr.logp[s], geo.logp, rtol=1e-6)
            np.testing.assert_allclose(tr.gram[s], geo.gram, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(tr.d_w[s], dyn.d_w, rtol=1e-5)
            np.testing.assert_allclose(tr.d_l[s], dyn.d_l, rtol=1e-5)
            np.testing.assert_array_equal(tr.case[s], dyn.case)
        assert np.abs(tr.logp[-1] - tr.logp[0]).max() > 1e-3  # training moved the probes
        # the trainer's own optimizer split the step before each record; the last interval's first
        # order equals flattened gradients dotted with the saved parameter change (float32)
        assert tr.metadata["step_split"] == "torch.optim.adamw.AdamW"
        assert np.isfinite(tr.step_delta[1:]).all() and np.isfinite(tr.actual_delta[1:]).all()
        total = sum(tr.step_parts.values())
        np.testing.assert_allclose(total[1:], tr.step_delta[1:], rtol=1e-9, atol=1e-12)
        assert np.abs(tr.step_parts["residual"][1:]).max() < 1e-3 * np.abs(tr.step_delta[1:]).max()
        names = [n for n, _ in model.named_parameters()]
        flat = lambda state: torch.cat([state[n].reshape(-1).double() for n in names])  # noqa: E731
        delta = flat(snapshots.states[12]) - flat(snapshots.states[9])
        ends = []
        for step in (9, 12):
            m = make_model("gpt2", dtype=torch.float32)
            m.load_state_dict(snapshots.states[step])
            ends.append(np.array([[float(flat_grad(m, names, *tr.input_ids(n, r)) @ delta) for r in range(len(tr.names))]
                                  for n in range(len(probes))]))  # the ids the trace scored
        np.testing.assert_allclose(tr.actual_delta[-1], 0.5 * (ends[0] + ends[1]), rtol=1e-3, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "marginscope/cosine_mean" in h]
    assert [h["step"] for h in logged] == [1, 3, 6, 9, 12]
    assert {"marginscope/case1_frac", "marginscope/logp_chosen_mean", "marginscope/logp_top_mean"} <= set(logged[0])
    assert {"marginscope/actual_r_chosen", "marginscope/case_agree_actual_observed"} <= set(logged[-1])


def test_dpo_trainer_parameters_bit_identical_with_the_callback(make_model, tokenizer, probes, tmp_path):
    plain = _dpo_trainer(make_model("gpt2", dtype=torch.float32, dropout=0.1), tokenizer, probes, tmp_path / "a", 4)
    plain.train()
    tracked = _dpo_trainer(make_model("gpt2", dtype=torch.float32, dropout=0.1), tokenizer, probes,
                           tmp_path / "b", 4)
    ms.integrations.attach(tracked, ms.integrations.TRLCallback(probes=probes, path=tmp_path / "run.h5", every=1,
                                                                per_token="head"))
    tracked.train()
    assert plain.args.gradient_checkpointing and tracked.model.is_activation_checkpointing
    for (name, a), b in zip(plain.model.named_parameters(), tracked.model.parameters()):
        assert torch.equal(a, b), name
    with ms.trace.open(tmp_path / "run.h5") as tr:
        np.testing.assert_array_equal(tr.steps, [0, 1, 2, 3, 4])


def test_trl_callback_refuses_a_loss_it_cannot_express(make_model, tokenizer, probes, tmp_path):
    trainer = _dpo_trainer(make_model("gpt2", dtype=torch.float32), tokenizer, probes, tmp_path, 2,
                           use_weighting=True)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=tmp_path / "run.h5"))
    with pytest.raises(ms.MarginscopeError, match="WPO"):
        trainer.train()


def test_hf_trainer_callback_records_an_sft_run(make_model, tokenizer, probes, tmp_path):
    model = make_model("llama", dtype=torch.float32)
    texts = [p.prompt + p.chosen for p in probes] * 4
    data = datasets.Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                           remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    ms.integrations.attach(trainer, ms.integrations.TrackerCallback(
        probes=probes, path=tmp_path / "sft.h5", every=2, loss=ms.losses.get("dpo", beta=0.1)))
    trainer.train()
    with ms.trace.open(tmp_path / "sft.h5") as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4])
        assert tr.metadata["trainer"] == "Trainer"
        w = tr.names.index("chosen")
        assert tr.logp[-1, :, w].mean() > tr.logp[0, :, w].mean()  # SFT on the chosen texts raises them
    assert any("marginscope/cosine_mean" in h for h in trainer.state.log_history)


def test_hf_callback_needs_a_loss(make_model, tokenizer, probes, tmp_path):
    cb = ms.integrations.TrackerCallback(probes=probes, path=tmp_path / "x.h5")
    with pytest.raises(TypeError, match="loss"):
        cb.resolve_loss(None)


def test_dpo_trainer_resumed_from_a_checkpoint_continues_the_trace(make_model, tokenizer, probes, tmp_path):
    path = tmp_path / "run.h5"
    first = _dpo_trainer(make_model("gpt2", dtype=torch.float32), tokenizer, probes, tmp_path, 6,
                         save_strategy="steps", save_steps=3)
    ms.integrations.attach(first, ms.integrations.TRLCallback(probes=probes, path=path, every=2))
    first.train()
    with ms.trace.open(path) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4, 6])
        before = tr.logp
    second = _dpo_trainer(make_model("gpt2", dtype=torch.float32), tokenizer, probes, tmp_path, 6)
    ms.integrations.attach(second, ms.integrations.TRLCallback(probes=probes, path=path, every=2))
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    with ms.trace.open(path) as tr:
        np.testing.assert_array_equal(tr.steps, [0, 2, 4, 6])  # step 3 is off the every=2 schedule
        np.testing.assert_array_equal(tr.logp[:2], before[:2])
        np.testing.assert_allclose(tr.logp[2:], before[2:], rtol=1e-5)  # the same training, replayed
        np.testing.assert_allclose(tr.observed_delta[2], tr.logp[2] - tr.logp[1], rtol=1e-9)
        assert tr.metadata["start_step"] == 0


def test_inrun_dpo_trainer_writes_every_training_pair_into_the_trace(make_model, tokenizer, probes, tmp_path):
    model = make_model("llama", dtype=torch.float32)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in probes] * 4
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         seed=0, disable_tqdm=True)
    trainer = ms.integrations.InRunDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                              train_dataset=datasets.Dataset.from_list(rows),
                                              processing_class=tokenizer)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=tmp_path / "run.h5", every=2))
    trainer.train()
    with ms.trace.open(tmp_path / "run.h5") as tr:
        inrun = tr.inrun()
        np.testing.assert_array_equal(inrun["step"], [1, 1, 2, 2, 3, 3, 4, 4])
        np.testing.assert_array_equal(inrun["pair"], [0, 1] * 4)
        assert np.isfinite(inrun["inner"]).all() and (inrun["sq_w"] > 0).all()
        assert np.isfinite(inrun["logp_w"]).all() and set(inrun["case"].tolist()) <= {1, 2, 3, 4}
    assert any("marginscope/inrun_cosine_mean" in h for h in trainer.state.log_history)


def test_inrun_dpo_trainer_attributes_the_step_to_its_pairs(make_model, tokenizer, probes, tmp_path):
    """TRL's fused head on a tied float64 GPT-2, 2 micro-batches per step, gradient clipping: every pair of
    the step before a record gets a probe_effect; they add up to the step's gradient part, and κ is
    the clipping factor max_norm / ‖g‖ TRL applied (1 when it did not clip)."""
    model = make_model("gpt2", dtype=torch.float64)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in probes] * 4
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4,
                         gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=True, seed=0, disable_tqdm=True, bf16=False, max_grad_norm=0.5)
    trainer = ms.integrations.InRunDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                              train_dataset=datasets.Dataset.from_list(rows),
                                              processing_class=tokenizer)
    recorder = ms.integrations.InRunRecorder()
    trainer.add_callback(recorder)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes=probes, path=tmp_path / "run.h5", every=2))
    trainer.train()
    assert all(r.pairs.gradients is None for r in recorder.records)  # only the tracker asked for them
    norms = {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h}
    with ms.trace.open(tmp_path / "run.h5") as tr:
        inrun, parts, steps = tr.inrun(), tr.step_parts, list(tr.steps)
    assert steps == [0, 2, 4]
    for step in (2, 4):
        sel = inrun["step"] == step
        effect = inrun["probe_effect"][sel]
        assert sel.sum() == 4 and np.isfinite(effect).all()
        # TRL's fused head computes its softmax in float32 even in a float64 model (trl/kernels/chunked_logprob.py),
        # so the gradient it stepped with differs from the exact float64 one by ~1e-7 relative
        np.testing.assert_allclose(effect.sum(0), parts["gradient"][steps.index(step)], rtol=1e-6,
                                   atol=1e-9 * np.abs(effect).max())
        np.testing.assert_allclose(inrun["effect_scale"][sel], min(1.0, 0.5 / norms[step]), rtol=1e-4)
        texts = set(inrun["chosen"][sel])
        assert texts <= {tokenizer.decode(tokenizer(p.chosen)["input_ids"]) + tokenizer.eos_token for p in probes} or \
            all(any(p.chosen.strip() in t for p in probes) for t in texts)
        assert all(t for t in inrun["prompt"][sel])
    assert np.isnan(inrun["probe_effect"][np.isin(inrun["step"], [1, 3])]).all()
