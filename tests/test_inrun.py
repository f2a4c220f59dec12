"""In-run pair geometry equals the exact per-pair values of the same step, and never changes training."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics import ghost
from marginscope.dynamics.ghost import FunctionalHead, LogitTransform
from marginscope.dynamics.inrun import InRunGeometry, score_pairs
from marginscope.dynamics.scoring import sequence_logp


def _step_inputs(geo, ref):
    w, l = geo.index("chosen"), geo.index("rejected")
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(ref[:, w]), t(ref[:, l]), t(geo.lengths[:, w]), t(geo.lengths[:, l])


@pytest.mark.parametrize("loss_name", ["dpo", "simpo", "ipo", "cpo", "kto"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_inrun_equals_exact_pair_geometry(make_model, tokenizer, probes, loss_name, arch):
    model = make_model(arch)
    reference = make_model(arch, seed=1)
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    ref = sequence_logp(reference, geo.encoded).numpy()
    loss = ms.losses.get(loss_name)
    n = len(probes)
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        loss(logps[:n], logps[n:], *_step_inputs(geo, ref)).mean().backward()
    got = rec.result()
    np.testing.assert_allclose(got.inner, geo.gram[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(got.sq_w, geo.gram[:, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(got.sq_l, geo.gram[:, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(got.cosine, geo.cosine[:, 0, 1], rtol=1e-6)
    d_w, d_l = ms.dynamics.coefficients(loss, geo.logp[:, 0], geo.logp[:, 1], ref[:, 0], ref[:, 1],
                                        geo.lengths[:, 0], geo.lengths[:, 1])
    np.testing.assert_allclose(-got.scale_w * n, d_w, rtol=1e-9)
    np.testing.assert_allclose(got.scale_l * n, d_l, rtol=1e-9)
    np.testing.assert_array_equal(got.case, ms.dynamics.classify(geo.gram, d_w, d_l))
    model.zero_grad(set_to_none=True)


def _train(model, batches, ref, with_geometry: bool, steps: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = ms.losses.get("dpo")
    model.train()
    seen = []
    for step in range(steps):
        enc = batches
        n = len(enc)
        opt.zero_grad(set_to_none=True)
        ctx = InRunGeometry(model, n_pairs=n, params="all") if with_geometry else None
        if ctx:
            ctx.__enter__()
        logps, _ = score_pairs(model, enc)
        if ctx:
            ctx.watch(logps)
        lengths = torch.tensor([[len(e.response_ids[0]), len(e.response_ids[1])] for e in enc], dtype=logps.dtype)
        loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], lengths[:, 0], lengths[:, 1]).mean().backward()
        if ctx:
            ctx.__exit__(None, None, None)
            seen.append(ctx.result())
        opt.step()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_is_bit_identical_with_and_without_inrun_hooks(make_model, tokenizer, probes, dtype):
    encoded = ms.dynamics.encode(tokenizer, probes)
    ref = torch.tensor(sequence_logp(make_model("llama", seed=1, dtype=dtype), encoded).numpy(), dtype=dtype)
    plain, hooked = make_model("llama", dtype=dtype), make_model("llama", dtype=dtype)
    torch.manual_seed(0)
    _train(plain, encoded, ref, with_geometry=False)
    torch.manual_seed(0)
    seen = _train(hooked, encoded, ref, with_geometry=True)
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    assert len(seen) == 3 and all(np.isfinite(r.cosine).all() for r in seen)
    for module in hooked.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_zero_scale_pair_is_nan_not_a_crash(make_model, tokenizer, probes):
    model = make_model("gpt2")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all")
    n = len(probes)
    weights = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # pair 1 contributes nothing
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        (weights * -torch.nn.functional.logsigmoid(0.1 * (logps[:n] - logps[n:]))).sum().backward()
    got = rec.result()
    assert np.isnan(got.inner[1]) and np.isnan(got.cosine[1]) and got.case[1] == 0
    np.testing.assert_allclose(got.inner[[0, 2]], geo.gram[[0, 2], 0, 1], rtol=1e-6)
    model.zero_grad(set_to_none=True)


def test_inrun_under_non_reentrant_gradient_checkpointing(make_model, tokenizer, probes):
    model = make_model("llama")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF only checkpoints in train mode; the tiny configs have no dropout
    n = len(probes)
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        logps, _ = score_pairs(model, geo.encoded)
        rec.watch(logps)
        (-torch.nn.functional.logsigmoid(0.1 * (logps[:n] - logps[n:]))).mean().backward()
    got = rec.result()
    np.testing.assert_allclose(got.inner, geo.gram[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(got.sq_w, geo.gram[:, 0, 0], rtol=1e-6)


def test_no_backward_gives_nan_result(make_model, tokenizer, probes):
    model = make_model("gpt2")
    enc = ms.dynamics.encode(tokenizer, probes)
    with InRunGeometry(model, n_pairs=len(enc), params="all") as rec:
        with torch.no_grad():
            score_pairs(model, enc)
    assert np.isnan(rec.result().inner).all()


# --- a head used outside its module (fused log-prob kernels, TRL 1.x's fused_lm_head) -----------------

def _padded_batch(encoded):
    """TRL's layout: [chosen; rejected] rows of prompt + response, right-padded; labels masked."""
    rows = [(p.prompt_ids, p.response_ids[0]) for p in encoded] + [(p.prompt_ids, p.response_ids[1]) for p in encoded]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(list(prompt) + list(response))
        attention[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return rows, ids, attention, ids.masked_fill(completion == 0, -100)


def _functional_token_logps(model, ids, attention, labels, transform):
    """Per-token log-probs the way a fused kernel computes them: the backbone's hidden states through the
    head's weight and bias in a functional op (the head module is never called), logits transformed."""
    hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    start = InRunGeometry.head_start()
    head = model.get_output_embeddings()
    h = hidden[:, :-1]
    z, _ = transform(torch.nn.functional.linear(h, head.weight, head.bias))
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps = z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    return token_logps, mask, FunctionalHead(head, h, targets.clamp(min=0), start, transform)


def _row_grads(model, ids, attention, labels, transform):
    """Oracle: each row's ∇ Σ_t log p(y_t) of the same functional computation, one autograd.grad per row."""
    params = [p for p in model.parameters()]
    token_logps, _, _ = _functional_token_logps(model, ids, attention, labels, transform)
    logp = token_logps.sum(1)
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        logp[i], params, retain_graph=True)]) for i in range(len(logp))])


@pytest.mark.parametrize("materialize", [None, True])
@pytest.mark.parametrize("arch,transform,bias", [
    ("gpt2", LogitTransform(), False),  # tied: the head's cross terms with the token embedding
    ("llama", LogitTransform(), False),
    ("llama", LogitTransform(scale=0.7, softcap=3.0, temperature=0.9), True),  # Gemma-style softcap, head bias
])
def test_functional_head_equals_autograd(make_model, tokenizer, probes, arch, transform, bias, materialize):
    model = make_model(arch)
    if bias:
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(model.get_output_embeddings().weight)
            head.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        model.set_output_embeddings(head)
    encoded = ms.dynamics.encode(tokenizer, probes)
    rows, ids, attention, labels = _padded_batch(encoded)
    n = len(encoded)
    grads = _row_grads(model, ids, attention, labels, transform)
    with InRunGeometry(model, n_pairs=n, params="all", materialize=materialize) as rec:
        token_logps, mask, head = _functional_token_logps(model, ids, attention, labels, transform)
        rec.watch_tokens(token_logps, mask, head=head)
        logp = token_logps.sum(1)
        (-torch.nn.functional.logsigmoid(0.1 * (logp[:n] - logp[n:]))).mean().backward()
    got = rec.result()
    gw, gl = grads[:n], grads[n:]
    sq_w, sq_l = (gw * gw).sum(1).numpy(), (gl * gl).sum(1).numpy()
    np.testing.assert_allclose(got.sq_w, sq_w, rtol=1e-6)
    np.testing.assert_allclose(got.sq_l, sq_l, rtol=1e-6)
    # Llama's RMSNorm runs in float32 inside: a small inner product is compared at the norms' scale
    np.testing.assert_allclose(got.inner, (gw * gl).sum(1), rtol=0, atol=1e-6 * np.sqrt(sq_w * sq_l).max())
    np.testing.assert_allclose(rec.logps, logp.detach().numpy(), rtol=1e-12)
    assert np.all(got.scale_w < 0) and np.all(got.scale_l > 0)
    model.zero_grad(set_to_none=True)


def test_functional_head_is_refused_without_watch_head(make_model, tokenizer, probes):
    model = make_model("llama")
    encoded = ms.dynamics.encode(tokenizer, probes)
    _, ids, attention, labels = _padded_batch(encoded)
    with InRunGeometry(model, n_pairs=len(encoded), params="all") as rec:
        token_logps, mask, _ = _functional_token_logps(model, ids, attention, labels, LogitTransform())
        with pytest.raises(ms.MarginscopeError, match="lm_head.weight is used outside"):
            rec.watch_tokens(token_logps, mask)


def test_rows_whose_tokens_get_different_gradients_are_nan(make_model, tokenizer, probes):
    """A loss that weights a row's tokens unequally (TRL's ld_alpha) gives no scaled ∇log π for that row."""
    model = make_model("llama")
    encoded = ms.dynamics.encode(tokenizer, probes)
    _, ids, attention, labels = _padded_batch(encoded)
    n = len(encoded)
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact", convention="separate")
    with InRunGeometry(model, n_pairs=n, params="all") as rec:
        token_logps, mask, head = _functional_token_logps(model, ids, attention, labels, LogitTransform())
        rec.watch_tokens(token_logps, mask, head=head)
        weights = torch.ones_like(token_logps)
        weights[n + 1, mask[n + 1].nonzero()[-1]] = 0.5  # the last token of pair 1's rejected row
        logp = (token_logps * weights).sum(1)
        (-torch.nn.functional.logsigmoid(0.1 * (logp[:n] - logp[n:]))).mean().backward()
    got = rec.result()
    assert np.isnan(got.scale_l[1]) and np.isnan(got.sq_l[1]) and np.isnan(got.inner[1]) and got.case[1] == 0
    assert np.isfinite(got.scale_w[1])
    np.testing.assert_allclose(got.inner[[0, 2]], geo.gram[[0, 2], 0, 1], rtol=1e-6)
    np.testing.assert_allclose(got.sq_w, geo.gram[:, 0, 0], rtol=1e-6)
    model.zero_grad(set_to_none=True)


def test_failing_hook_with_on_error_reports_and_never_raises(make_model, tokenizer, probes, monkeypatch):
    model = make_model("gpt2")
    encoded = ms.dynamics.encode(tokenizer, probes)
    _, ids, attention, labels = _padded_batch(encoded)
    n = len(encoded)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ghost.collector, "softmax_head_factors", boom)
    errors = []
    reference = [p.detach().clone() for p in model.parameters()]
    with InRunGeometry(model, n_pairs=n, params="all", on_error=errors.append) as rec:
        token_logps, mask, head = _functional_token_logps(model, ids, attention, labels, LogitTransform())
        rec.watch_tokens(token_logps, mask, head=head)
        logp = token_logps.sum(1)
        (-torch.nn.functional.logsigmoid(0.1 * (logp[:n] - logp[n:]))).mean().backward()
    assert [str(e) for e in errors] == ["boom"] and rec.failed
    assert np.isnan(rec.result().inner).all()
    expected = torch.autograd.grad(  # the gradients are those of the same step without the geometry
        -torch.nn.functional.logsigmoid(0.1 * (lambda lp: lp[:n] - lp[n:])(
            _functional_token_logps(model, ids, attention, labels, LogitTransform())[0].sum(1))).mean(),
        list(model.parameters()))
    for p, g, r in zip(model.parameters(), expected, reference):
        assert torch.equal(p.grad, g) and torch.equal(p, r)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("watch", [False, True])
def test_checkpointing_recomputation_is_not_recorded(make_model, tokenizer, probes, watch):
    """A scope inside the last checkpointed block: its recomputation runs before any hook of the scope
    fires, so only `in_backward()` (and, with `watch`, the scale hook) keeps it from being recorded as
    new uses that would wait forever (holding their factors)."""
    model = make_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    scope = ms.dynamics.select_parameters(model, r"layers\.1\.self_attn\.q_proj")
    encoded = ms.dynamics.encode(tokenizer, probes)
    with ghost.GhostCollector(model, scope, [[0, len(encoded)]]) as collector:
        logps, _ = score_pairs(model, encoded)
        collector.check_attribution(logps)
        if watch:
            logps.register_hook(lambda g: collector.stop_recording())
        logps.sum().backward()
        assert not any(collector._sums._pending.values())
        assert torch.isfinite(collector.grams[0]).all() and collector.grams[0][0, 0] > 0
    model.zero_grad(set_to_none=True)
