"""What actually happened (DESIGN.md §2b): directional derivatives, the actual-update first order and
the step split, each against an independent oracle (torch.func gradients of one unpadded sequence,
flattened and dotted with the saved parameter differences; the optimizer's update recomputed by torch's
own optimizer on copies, or by hand from its post-step state)."""

from __future__ import annotations

import copy
import inspect
import logging

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics.update import directional_logp
from marginscope.probes import ProbeSet
from oracles import flat_grad

TRAIN = [  # training pairs, other than the probes
    {"id": "t0", "prompt": "The food was great. The sentiment is", "chosen": " positive.", "rejected": " negative."},
    {"id": "t1", "prompt": "Awful service", "chosen": " no", "rejected": " yes, very good"},
    {"id": "t2", "prompt": "It broke on day one.", "chosen": " bad", "rejected": " it is fine and good"},
]


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """HF's Llama/Qwen2 RMSNorm computes in float32 even in a float64 model, which bounds forward-mode
    tangents through it at ~1e-5 relative; the oracles here compare exact float64 arithmetic."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(cls, "forward", _rms_norm_in_input_dtype)


def _model(make_model, arch: str, dropout: float = 0.0):
    if arch != "lora":
        return make_model(arch, dropout=dropout)
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    return peft.get_peft_model(make_model("llama", dropout=dropout), config)


def _scope(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _flat(values: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([values[n].reshape(-1).double() for n in names])


def _at(model, values: dict[str, torch.Tensor]):
    """A copy of `model` with the scope parameters set to `values`."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in values:
                p.copy_(values[n])
    return other


def _dpo_loss(model, tokenizer, sign: float = 1.0) -> torch.Tensor:
    encoded = ms.dynamics.encode(tokenizer, ProbeSet.from_records(TRAIN))
    rows = [row for e in encoded for row in e.rows()]
    logp = ms.dynamics.score_rows(model, rows).logp.view(-1, 2)
    return sign * -torch.nn.functional.logsigmoid(0.5 * (logp[:, 0] - logp[:, 1])).mean()


def _train(model, tokenizer, optimizer, steps: int, tracker=None, scheduler=None, sign: float = 1.0,
           before_step=None, after_step=None):
    """Train and return the scope after every step ({step: values}, 0 = before training);
    before_step(step) / after_step(step) run around each optimizer.step()."""
    states = {0: _scope(model)}
    model.train()
    for step in range(1, steps + 1):
        _dpo_loss(model, tokenizer, sign).backward()
        if before_step is not None:
            before_step(step)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        states[step] = _scope(model)
        if tracker is not None:
            tracker.step(step)
    return states


def _oracle_grads(model, values, names, encoded) -> np.ndarray:
    """[N, R, P] flattened ∇ log π of every probe response at the scope values `values`."""
    m = _at(model, values).eval()
    return np.stack([np.stack([flat_grad(m, names, e.prompt_ids, r).numpy() for r in e.response_ids])
                     for e in encoded])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "lora"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_directional_logp_equals_flattened_gradient_dot(make_model, tokenizer, probes, arch, padding_side):
    model = _model(make_model, arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(3)
    tangents = [{n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
                 if p.requires_grad} for _ in range(2)]
    shifted = {n: p.detach() + 0.05 * tangents[0][n] for n, p in model.named_parameters() if p.requires_grad}
    encoded = ms.dynamics.encode(tokenizer, probes)
    before = _scope(model)
    for at, reference in ((None, model), (shifted, _at(model, shifted))):
        logp, deriv = directional_logp(model, encoded, tangents, at=at, batch_size=2, padding_side=padding_side)
        for i, e in enumerate(encoded):
            for j, response in enumerate(e.response_ids):
                g = flat_grad(reference.eval(), names, e.prompt_ids, response)
                for k, tangent in enumerate(tangents):
                    expected = float(g @ _flat(tangent, names))
                    np.testing.assert_allclose(np.nansum(deriv[k, i, j]), expected, rtol=1e-6, atol=1e-9)
                assert np.isnan(deriv[:, i, j, len(response):]).all() and np.isnan(logp[i, j, len(response):]).all()
        # per token, on the longest response
        e = encoded[0]
        for t in range(len(e.response_ids[1])):
            g = flat_grad(reference.eval(), names, e.prompt_ids, e.response_ids[1], token=t)
            np.testing.assert_allclose(deriv[1, 0, 1, t], float(g @ _flat(tangents[1], names)), rtol=1e-6, atol=1e-9)
    after = _scope(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the model was never touched


def _copied_optimizer_parts(model, optimizer):
    """Oracle parts of the next AdamW/SGD step from torch's own optimizer on copies: the full step, the
    step without weight decay, and the step without weight decay or momentum (first moment / momentum
    buffer zeroed)."""
    def run(weight_decay: bool, momentum: bool) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        accepted = inspect.signature(type(optimizer)).parameters
        opt = type(optimizer)([p for p in m.parameters() if p.requires_grad], **{k: v for k, v in optimizer.defaults.items() if k in accepted})
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for group in opt.param_groups:
            if not weight_decay:
                group["weight_decay"] = 0.0
        for p, q in zip(m.parameters(), model.parameters()):
            p.grad = None if q.grad is None else q.grad.clone()
            if not momentum and p in opt.state:
                for key in ("exp_avg", "momentum_buffer"):
                    if opt.state[p].get(key) is not None:
                        opt.state[p][key] = torch.zeros_like(opt.state[p][key])
        before = _scope(m)
        opt.step()
        return {n: v - before[n] for n, v in _scope(m).items()}

    full, no_decay, gradient = run(True, True), run(False, True), run(False, False)
    return {"gradient": gradient, "momentum": {n: no_decay[n] - gradient[n] for n in full},
            "weight_decay": {n: full[n] - no_decay[n] for n in full}}


def _adam_l2_parts(optimizer, model, before: dict, grads: dict, exp_avg_before: dict):
    """Oracle parts of an Adam (L2 decay, maybe amsgrad) step from its post-step state, by hand."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    out = {"gradient": {}, "momentum": {}, "weight_decay": {}}
    for n, p in model.named_parameters():
        if n not in before:
            continue
        st = optimizer.state[p]
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        denom = v.double().sqrt() / (1 - beta2 ** t) ** 0.5 + eps
        size = lr / (1 - beta1 ** t)
        out["gradient"][n] = -size * (1 - beta1) * grads[n].double() / denom
        out["weight_decay"][n] = -size * (1 - beta1) * wd * before[n].double() / denom
        out["momentum"][n] = -size * beta1 * exp_avg_before[n].double() / denom
    return out


OPTIMIZERS = {
    "adamw+schedule": lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1),
    "adam-l2-amsgrad": lambda params: torch.optim.Adam(params, lr=2e-3, weight_decay=0.05, amsgrad=True),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-dampening-maximize": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.8, dampening=0.3,
                                                             weight_decay=0.02, maximize=True),
}


@pytest.mark.parametrize("arch,opt_name,every", [
    ("gpt2", "adamw+schedule", 2), ("llama", "adamw+schedule", 1), ("qwen2", "adam-l2-amsgrad", 2),
    ("lora", "adamw+schedule", 2), ("gpt2", "sgd-nesterov", 1), ("llama", "sgd-dampening-maximize", 2),
])
def test_actual_update_views_equal_the_oracles(make_model, tokenizer, probes, tmp_path, arch, opt_name, every):
    probes = probes[:2]
    n_steps = 2 * every + 1  # records at 0, every, 2·every: two intervals, the second with momentum
    model = _model(make_model, arch)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[opt_name]([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s)) if "schedule" in opt_name else None
    sign = -1.0 if optimizer.defaults.get("maximize") else 1.0
    expected_parts: dict[int, dict] = {}
    pending: dict[int, tuple] = {}

    def before_step(step: int) -> None:
        if step % every:
            return
        if opt_name.startswith("adam-l2"):  # by hand, from the state right after the step
            before = _scope(model)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in before}
            m_prev = {n: optimizer.state[p]["exp_avg"].clone() if p in optimizer.state else torch.zeros_like(p)
                      for n, p in model.named_parameters() if n in before}
            pending[step] = (before, grads, m_prev)
        else:
            expected_parts[step] = _copied_optimizer_parts(model, optimizer)

    def after_step(step: int) -> None:
        if step in pending:
            expected_parts[step] = _adam_l2_parts(optimizer, model, *pending.pop(step))

    path = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=every, optimizer=optimizer) as tracker:
        encoded = tracker.encoded  # the ids the tracker scores (its convention)
        states = _train(model, tokenizer, optimizer, n_steps, tracker, scheduler, sign, before_step, after_step)
    with ms.trace.open(path) as tr:
        steps = tr.steps.tolist()
        assert steps == list(range(0, n_steps + 1, every))
        assert "torch.optim" in tr.metadata["step_split"]
        actual, step_delta, parts = tr.actual_delta, tr.step_delta, tr.step_parts
        actual_token = tr.actual_token_delta
        assert np.isnan(actual[0]).all() and np.isnan(step_delta[0]).all()
        for s in range(1, len(steps)):
            q, p = steps[s], steps[s - 1]
            delta = _flat(states[q], names) - _flat(states[p], names)
            g_q = _oracle_grads(model, states[q], names, encoded)
            g_p = _oracle_grads(model, states[p], names, encoded)
            np.testing.assert_allclose(actual[s], 0.5 * (g_p + g_q) @ delta.numpy(), rtol=1e-6, atol=1e-10)
            np.testing.assert_allclose(np.nansum(actual_token[s], axis=-1), actual[s], rtol=1e-9, atol=1e-12)
            step_vec = _flat(states[q], names) - _flat(states[q - 1], names)
            np.testing.assert_allclose(step_delta[s], g_q @ step_vec.numpy(), rtol=1e-6, atol=1e-10)
            for part, vectors in expected_parts[q].items():
                np.testing.assert_allclose(parts[part][s], g_q @ _flat(vectors, names).numpy(), rtol=1e-6,
                                           atol=1e-10, err_msg=part)
            total = sum(parts[k][s] for k in ("gradient", "momentum", "weight_decay", "residual"))
            np.testing.assert_allclose(total, step_delta[s], rtol=1e-9, atol=1e-14)
            assert np.abs(parts["residual"][s]).max() <= 1e-9 * np.abs(step_delta[s]).max()
            np.testing.assert_array_equal(tr.case_actual[s], ms.dynamics.classify_delta(actual[s]))
            np.testing.assert_array_equal(tr.case_observed[s], ms.dynamics.classify_delta(tr.observed_delta[s]))


def test_training_is_bit_identical_with_the_views(make_model, tokenizer, probes, tmp_path):
    def run(tracked: bool):
        torch.manual_seed(0)
        model = make_model("gpt2", dropout=0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        tracker = ms.Tracker(model, tokenizer, probes, tmp_path / f"run{tracked}.h5", loss="dpo", every=2,
                             optimizer=optimizer, snapshot_device="cpu") if tracked else None
        torch.manual_seed(1)
        states = _train(model, tokenizer, optimizer, 4, tracker)
        if tracker is not None:
            tracker.close()
        return states[4], optimizer.state_dict()["state"]

    (plain, plain_state), (tracked, tracked_state) = run(False), run(True)
    assert all(torch.equal(plain[n], tracked[n]) for n in plain)
    for k in plain_state:
        for key, value in plain_state[k].items():
            assert torch.equal(value, tracked_state[k][key]), (k, key)
    with ms.trace.open(tmp_path / "runTrue.h5") as tr:
        assert np.isfinite(tr.step_delta[1:]).all() and np.isfinite(tr.actual_delta[1:]).all()


def test_an_optimizer_without_a_split_records_step_delta_only(make_model, tokenizer, probes, tmp_path):
    model = make_model("gpt2")
    optimizer = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    path = tmp_path / "run.h5"
    with ms.Tracker(model, tokenizer, probes, path, loss="dpo", every=1, optimizer=optimizer) as tracker:
        states = _train(model, tokenizer, optimizer, 2, tracker)
    names = [n for n, _ in model.named_parameters()]
    with ms.trace.open(path) as tr:
        assert tr.metadata["step_split"].startswith("unavailable: torch.optim.adagrad.Adagrad")
        assert all(np.isnan(v).all() for v in tr.step_parts.values())
        g = _oracle_grads(model, states[2], names, tracker.encoded)
        expected = g @ (_flat(states[2], names) - _flat(states[1], names)).numpy()
        np.testing.assert_allclose(tr.step_delta[2], expected, rtol=1e-6)


def test_a_failing_step_split_never_reaches_training(make_model, tokenizer, probes, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("split exploded")

    monkeypatch.setitem(ms.dynamics.optimizers.SPLITTERS, "AdamW", broken)
    model = make_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain_model = make_model("gpt2")
    plain = _train(plain_model, tokenizer, torch.optim.AdamW(plain_model.parameters(), lr=1e-3), 3)
    with caplog.at_level(logging.ERROR, logger="marginscope"):
        with ms.Tracker(model, tokenizer, probes, tmp_path / "run.h5", loss="dpo", every=1,
                        optimizer=optimizer) as tracker:
            got = _train(model, tokenizer, optimizer, 3, tracker)
    assert all(torch.equal(plain[3][n], got[3][n]) for n in plain[3])
    assert sum("update measurement failed" in r.getMessage() for r in caplog.records) == 1
    with ms.trace.open(tmp_path / "run.h5") as tr:
        assert tr.steps.tolist() == [0, 1, 2, 3] and np.isnan(tr.step_delta).all()
        assert np.isfinite(tr.gram).all()  # the other measurements go on


def test_accelerate_wrapped_optimizer_is_unwrapped(make_model):
    from marginscope.step_capture import inner_optimizer

    model = make_model("gpt2")
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:  # the shape of accelerate's AcceleratedOptimizer
        optimizer = inner

    assert inner_optimizer(Wrapper()) is inner
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        inner_optimizer(object())


def _param_groups(params):
    params = list(params)
    return [{"params": params[::2], "lr": 3e-3, "weight_decay": 0.2}, {"params": params[1::2], "lr": 1e-3}]


@pytest.mark.parametrize("variant", ["foreach", "fused", "param groups"])
def test_adamw_variants_split_exactly(make_model, tokenizer, probes, tmp_path, variant):
    """The formula's parts leave no residual of the real update: foreach and fused kernels, and param
    groups with their own learning rate and weight decay."""
    model = make_model("gpt2")
    if variant == "param groups":
        optimizer = torch.optim.AdamW(_param_groups(model.parameters()), lr=2e-3, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, **{variant: True})
    with ms.Tracker(model, tokenizer, probes[:1], tmp_path / "run.h5", loss="dpo", every=2,
                    optimizer=optimizer) as tracker:
        _train(model, tokenizer, optimizer, 4, tracker)
    with ms.trace.open(tmp_path / "run.h5") as tr:
        parts = tr.step_parts
        assert np.isfinite(tr.step_delta[1:]).all() and (np.abs(parts["momentum"][2]) > 0).all()
        assert np.abs(parts["residual"][1:]).max() <= 1e-9 * np.abs(tr.step_delta[1:]).max()
