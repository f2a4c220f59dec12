"""The exact engine against torch.func oracles, on several architectures, scopes and paddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import marginscope as ms
from marginscope.dynamics import select_parameters
from oracles import oracle_gram, oracle_logp, oracle_token_gram

ARCHS = [("gpt2", {}), ("llama", {}), ("qwen2", {}), ("gpt_neox", {}), ("llama", {"tie": True})]


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("arch,kwargs", ARCHS, ids=[f"{a}{'-tied' if k else ''}" for a, k in ARCHS])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gram_and_logp_match_torch_func_oracle(make_model, tokenizer, probes, arch, kwargs, side):
    model = make_model(arch, **kwargs)
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact",
                              padding_side=side, batch_size=2)
    scope = select_parameters(model, "all")
    assert geo.names == ["chosen", "rejected", "top"]
    for n in range(len(probes)):
        prompt = geo.input_ids(n, 0)[0].tolist()
        responses = [geo.input_ids(n, r)[1].tolist() for r in range(3)]
        expected = oracle_gram(model, scope.names, prompt, responses)
        assert _rel(geo.gram[n], expected.numpy()) <= 1e-6
        for r in range(3):
            assert geo.logp[n, r] == pytest.approx(oracle_logp(model, prompt, responses[r]), rel=1e-9)
            t = geo.lengths[n, r]
            assert np.isfinite(geo.token_logp[n, r, :t]).all() and np.isnan(geo.token_logp[n, r, t:]).all()
    np.testing.assert_allclose(geo.logp, np.nansum(geo.token_logp, -1))


def test_left_and_right_padding_give_identical_numbers(make_model, tokenizer, probes):
    model = make_model("qwen2")
    right = ms.dynamics.measure(model, tokenizer, probes, params="all", padding_side="right")
    left = ms.dynamics.measure(model, tokenizer, probes, params="all", padding_side="left")
    np.testing.assert_allclose(left.logp, right.logp, rtol=1e-12)
    np.testing.assert_allclose(left.gram, right.gram, rtol=1e-10)


def test_tied_embeddings_counted_once(make_model):
    model = make_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    scope = select_parameters(model, "all")
    assert "lm_head.weight" not in scope.names and "transformer.wte.weight" in scope.names
    assert scope.numel == sum(p.numel() for p in model.parameters())


def test_lora_trainable_scope_matches_oracle(make_model, tokenizer, probes):
    peft = pytest.importorskip("peft")
    base = make_model("llama")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    geo = ms.dynamics.measure(model, tokenizer, probes)  # params="trainable" → LoRA A/B only
    scope = select_parameters(model, "trainable")
    assert scope.names and all("lora_" in n for n in scope.names)
    assert geo.n_params == scope.numel
    for n in range(len(probes)):
        prompt = geo.input_ids(n, 0)[0].tolist()
        responses = [geo.input_ids(n, r)[1].tolist() for r in range(3)]
        assert _rel(geo.gram[n], oracle_gram(model, scope.names, prompt, responses).numpy()) <= 1e-6


def test_regex_scope_and_names(make_model, tokenizer, probes):
    model = make_model("llama")
    geo = ms.dynamics.measure(model, tokenizer, probes, params=r"^lm_head\.")
    assert geo.scope_names == ["lm_head.weight"]
    scope = select_parameters(model, r"^lm_head\.")
    prompt = geo.input_ids(0, 0)[0].tolist()
    responses = [geo.input_ids(0, r)[1].tolist() for r in range(3)]
    assert _rel(geo.gram[0], oracle_gram(model, scope.names, prompt, responses).numpy()) <= 1e-6
    with pytest.raises(ms.MarginscopeError, match="selects no parameter"):
        ms.dynamics.measure(model, tokenizer, probes, params="nothing-matches-this")
    with pytest.raises(ms.MarginscopeError, match="no parameter named"):
        select_parameters(model, ["lm_head.weight", "not.a.param"])


def test_per_token_exact_matches_per_token_oracle(make_model, tokenizer, probes):
    """The one-backward-per-token oracle (engine="exact") against torch.func per-token gradients."""
    model = make_model("gpt2")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact", per_token="exact")
    names = select_parameters(model, "all").names
    for n, pid in enumerate(geo.probe_ids):
        prompt = geo.input_ids(n, 0)[0].tolist()
        w, l = geo.input_ids(n, "chosen")[1].tolist(), geo.input_ids(n, "rejected")[1].tolist()
        gram, sq_w, sq_l = oracle_token_gram(model, names, prompt, w, l)
        assert geo.token_gram[pid].shape == (len(w), len(l))
        assert _rel(geo.token_gram[pid], gram.numpy()) <= 1e-6
        np.testing.assert_allclose(geo.token_sqnorm[pid][0], sq_w.numpy(), rtol=1e-6)
        np.testing.assert_allclose(geo.token_sqnorm[pid][1], sq_l.numpy(), rtol=1e-6)
        cos = geo.token_cosine(pid)
        assert np.all(np.abs(cos) <= 1 + 1e-9)
        # the per-token gradients of a response sum to its sequence gradient
        np.testing.assert_allclose(float(gram.sum()), geo.gram[n, 0, 1], rtol=1e-6)


def test_margin_pitfalls_theorem1_uniform_last_layer(make_model, tokenizer):
    """Learnable last layer, one response token, uniform prediction over M tokens (Theorem 1):
    ⟨a_w,a_l⟩ = −‖h‖²/M and ‖a_w‖² = ‖a_l‖² = (M−1)/M·‖h‖²."""
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits = 0 → uniform over the M = vocab tokens
    probes = ms.probes.ProbeSet.from_records([
        {"id": "a", "prompt": "The movie was", "chosen": "a", "rejected": "b"},
        {"id": "b", "prompt": "The service was terrible. The sentiment is", "chosen": "x", "rejected": "q"},
    ])
    geo = ms.dynamics.measure(model, tokenizer, probes, params=r"^lm_head\.weight$", convention="separate")
    m = model.config.vocab_size
    captured = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    for n in range(len(probes)):
        assert list(geo.lengths[n]) == [1, 1]
        prompt = torch.tensor([geo.input_ids(n, 0)[0].tolist()])
        captured.clear()
        with torch.no_grad():
            model(input_ids=prompt)
        h2 = float((captured[0][0, -1].double() ** 2).sum())
        assert geo.gram[n, 0, 1] == pytest.approx(-h2 / m, rel=1e-9)
        assert geo.gram[n, 0, 0] == pytest.approx((m - 1) / m * h2, rel=1e-9)
        assert geo.gram[n, 1, 1] == pytest.approx((m - 1) / m * h2, rel=1e-9)
        assert geo.logp[n, 0] == pytest.approx(-np.log(m), rel=1e-12)
    hook.remove()


def test_measure_leaves_model_untouched(make_model, tokenizer, probes):
    model = make_model("gpt2")
    model.train()
    frozen = model.transformer.h[0].mlp.c_fc.weight
    frozen.requires_grad_(False)
    marked = model.transformer.ln_f.weight
    marked.grad = torch.full_like(marked, 3.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="exact")
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
        if p is marked:
            assert torch.equal(p.grad, torch.full_like(p, 3.0))
        else:
            assert p.grad is None, n


def test_bfloat16_model_scores_in_float32(make_model, tokenizer, probes):
    bf16 = make_model("llama", dtype=torch.bfloat16)
    rows = [(geo_prompt, r) for geo_prompt, r in [([1, 5, 7], [9, 11]), ([1, 4], [12])]]
    assert ms.dynamics.score_rows(bf16, rows).token_logp.dtype == torch.float32
    geo = ms.dynamics.measure(bf16, tokenizer, probes, params="all")
    same_weights = ms.dynamics.measure(bf16.to(torch.float64), tokenizer, probes, params="all")
    assert geo.logp.dtype == np.float64 and geo.gram.dtype == np.float64
    # only the bf16 activations differ: a few percent, not the ~0.4% per token of bf16 log-probs
    np.testing.assert_allclose(geo.logp, same_weights.logp, rtol=3e-2, atol=0.1)
    np.testing.assert_allclose(geo.cosine, same_weights.cosine, atol=0.1)


def test_probability_ntk_in_log_space(make_model, tokenizer, probes):
    geo = ms.dynamics.measure(make_model("gpt2"), tokenizer, probes, params="all")
    log_abs, sign = geo.log_prob_ntk()
    direct = np.exp(geo.logp[:, :, None] + geo.logp[:, None, :]) * geo.gram
    np.testing.assert_allclose(sign * np.exp(log_abs), direct, rtol=1e-10)
    np.testing.assert_allclose(geo.norms ** 2, np.einsum("nrr->nr", geo.gram))
    np.testing.assert_allclose(np.einsum("nrr->nr", geo.cosine), 1.0)


def test_add_eos_and_context_length(make_model, tokenizer, probes):
    model = make_model("gpt2")
    plain = ms.dynamics.measure(model, tokenizer, probes, convention="separate")
    eos = ms.dynamics.measure(model, tokenizer, probes, convention="separate", add_eos=True)
    np.testing.assert_array_equal(eos.lengths, plain.lengths + 1)
    assert eos.input_ids(0, 0)[1][-1] == tokenizer.eos_token_id
    long = ms.probes.ProbeSet.from_records([{"id": "long", "prompt": "The movie " * 80,
                                            "chosen": " good", "rejected": " bad"}])
    with pytest.raises(ms.MarginscopeError, match="longer than the model's context"):
        ms.dynamics.measure(model, tokenizer, long)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lm_head_at_scored_positions_only_gives_the_same_log_probs(make_model, tokenizer, probes, arch, side,
                                                                   monkeypatch):
    """HF decoders compute logits at the scored positions only (logits_to_keep); against full logits
    gathered at the same positions (the path of models without it, e.g. a wrapper)."""
    from marginscope.dynamics import scoring
    from oracles import ScaledLM
    model = make_model(arch)
    assert scoring._keeps_scored_logits(model) and not scoring._keeps_scored_logits(ScaledLM(model))
    rows = [row for probe in ms.dynamics.encode(tokenizer, probes) for row in probe.rows()]
    kept = scoring.score_rows(model, rows, padding_side=side)
    monkeypatch.setattr(scoring, "_keeps_scored_logits", lambda model: False)
    full = scoring.score_rows(model, rows, padding_side=side)
    torch.testing.assert_close(kept.token_logp, full.token_logp, rtol=1e-12, atol=1e-12)
