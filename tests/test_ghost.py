"""The ghost engine against the exact engine: architectures, scopes, paddings, ties, LoRA, dtypes,
checkpointing, unsupported parameters, and a model left exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutput

import marginscope as ms
from marginscope.dynamics import encode, score_rows, select_parameters
from marginscope.dynamics import ghost
from marginscope.dynamics.exact import exact_gram_chunk, gradient_scope
from marginscope.dynamics.ghost import GhostCollector, ghost_gram_chunk, ghost_supports
from oracles import ScaledLM

ARCHS = [("gpt2", {}), ("llama", {}), ("qwen2", {}), ("gpt_neox", {}), ("llama", {"tie": True})]


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _both(model, tokenizer, probes, **kwargs):
    exact = ms.dynamics.measure(model, tokenizer, probes, engine="exact", **kwargs)
    fast = ms.dynamics.measure(model, tokenizer, probes, engine="ghost", **kwargs)
    assert (exact.engine, fast.engine) == ("exact", "ghost")
    np.testing.assert_array_equal(fast.logp, exact.logp)
    return exact, fast


def _hooks(model) -> dict[str, list[int]]:
    """Every module hook by module and kind (HF installs some of its own, e.g. for hidden states)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks")
    return {f"{name}.{k}": list(getattr(m, k)) for name, m in model.named_modules() for k in kinds
            if getattr(m, k)}


def _chunk_grams(model, tokenizer, probes, scope, engine, **kwargs):
    chunk = encode(tokenizer, probes)
    with gradient_scope(model, scope):
        return engine(model, chunk, scope, **kwargs)[1]


@pytest.mark.parametrize("arch,kwargs", ARCHS, ids=[f"{a}{'-tied' if k else ''}" for a, k in ARCHS])
@pytest.mark.parametrize("side", ["right", "left"])
def test_ghost_equals_exact_all_parameters(make_model, tokenizer, probes, arch, kwargs, side):
    model = make_model(arch, **kwargs)
    exact, fast = _both(model, tokenizer, probes, params="all", padding_side=side, batch_size=2)
    assert _rel(fast.gram, exact.gram) <= 1e-6
    assert not _hooks(model)


@pytest.mark.parametrize("arch,params", [
    ("llama", r"^lm_head\."), ("llama", r"norm"), ("gpt2", r"^transformer\.wte\."),
    ("gpt2", r"wpe|ln_|c_attn\.bias"), ("qwen2", r"q_proj|embed_tokens"), ("gpt_neox", "trainable"),
])
def test_ghost_equals_exact_on_scopes(make_model, tokenizer, probes, arch, params):
    model = make_model(arch, tie=arch == "gpt2")
    exact, fast = _both(model, tokenizer, probes, params=params, batch_size=3, padding_side="left")
    assert fast.scope_names == exact.scope_names
    assert _rel(fast.gram, exact.gram) <= 1e-6


def test_embedding_padding_idx_gets_no_gradient(make_model, tokenizer):
    """A pad token inside a prompt: F.embedding gives its row no gradient (llama: padding_idx=0)."""
    probes = ms.probes.ProbeSet.from_records([
        {"id": "pad", "prompt": "Bad <|pad|> movie", "chosen": " no", "rejected": " yes it is"},
        {"id": "plain", "prompt": "Good", "chosen": " yes", "rejected": " no <|pad|>"}])
    model = make_model("llama", tie=True)
    assert model.model.embed_tokens.padding_idx == tokenizer.pad_token_id == 0
    assert tokenizer.pad_token_id in ms.dynamics.encode(tokenizer, probes)[0].prompt_ids
    exact, fast = _both(model, tokenizer, probes, params=r"embed_tokens")
    assert _rel(fast.gram, exact.gram) <= 1e-6


def test_tied_cross_terms_are_needed(make_model, tokenizer, probes, monkeypatch):
    """The wte/lm_head tie: without the cross terms between the two uses the Gram is wrong."""
    model = make_model("gpt2")
    scope = select_parameters(model, r"^transformer\.wte\.")
    exact = _chunk_grams(model, tokenizer, probes, scope, exact_gram_chunk)
    assert all(_rel(g, e) <= 1e-6 for g, e in zip(
        _chunk_grams(model, tokenizer, probes, scope, ghost_gram_chunk), exact))
    real = ghost.pair_gram
    zero = torch.zeros(3, 3, dtype=torch.float64)
    monkeypatch.setattr(ghost.sums, "pair_gram", lambda u, v, *a: real(u, v, *a) if u is v else zero)
    broken = _chunk_grams(model, tokenizer, probes, scope, ghost_gram_chunk)
    assert max(_rel(g, e) for g, e in zip(broken, exact)) > 1e-3


class Mixer(nn.Module):
    """A leaf module of no known kind (materialized per row) sharing its parameters with an
    embedding (`table`) and a linear layer (`w`): the dense × one-hot and dense × linear cross terms."""

    def __init__(self, table: nn.Parameter, w: nn.Parameter):
        super().__init__()
        self.table, self.w = table, w

    def forward(self, x):
        return x + 0.1 * torch.softmax(x @ self.table.T, -1) @ self.table + 0.1 * torch.tanh(x @ self.w.T)


def test_parameters_shared_with_a_generic_module(make_model, tokenizer, probes):
    model = make_model("llama")
    inner = model.model
    mixer = Mixer(inner.embed_tokens.weight, inner.layers[0].self_attn.o_proj.weight)
    inner.norm = nn.Sequential(inner.norm, mixer)
    assert ghost.plan_modules(model, select_parameters(model, "all"))[0][mixer][0] is ghost.ROWWISE
    for side in ("right", "left"):
        exact, fast = _both(model, tokenizer, probes, params="all", padding_side=side)
        assert _rel(fast.gram, exact.gram) <= 1e-6


def test_lora_trainable_scope(make_model, tokenizer, probes):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama"), config)
    for side in ("right", "left"):
        exact, fast = _both(model, tokenizer, probes, padding_side=side, batch_size=2)
        assert fast.scope_names and all("lora_" in n for n in fast.scope_names)
        assert _rel(fast.gram, exact.gram) <= 1e-6
    assert not _hooks(model)
    # HF's gradient-checkpointing helper makes the (frozen) embedding output a leaf requiring grad
    model.enable_input_require_grads()
    hooks = _hooks(model)
    exact, fast = _both(model, tokenizer, probes, batch_size=3)
    assert _rel(fast.gram, exact.gram) <= 1e-6 and np.abs(fast.gram).min() > 0
    assert _hooks(model) == hooks


@pytest.mark.parametrize("arch,kwargs", [("gpt2", {}), ("llama", {"tie": True}), ("qwen2", {})])
@pytest.mark.parametrize("materialize", [True, False])
def test_forced_materialize_and_forced_ghost_agree(make_model, tokenizer, probes, arch, kwargs,
                                                   materialize, monkeypatch):
    model = make_model(arch, **kwargs)
    scope = select_parameters(model, "all")
    exact = _chunk_grams(model, tokenizer, probes, scope, exact_gram_chunk, padding_side="left")
    calls = []
    real = ghost.contract._materialized
    monkeypatch.setattr(ghost.contract, "_materialized", lambda o, rows: calls.append(o) or real(o, rows))
    fast = _chunk_grams(model, tokenizer, probes, scope, ghost_gram_chunk, padding_side="left",
                        materialize=materialize)
    assert bool(calls) == materialize
    assert len(fast) == len(probes)
    for g, e in zip(fast, exact):
        assert g.dtype == torch.float64 and g.shape == (3, 3)
        assert _rel(g, e) <= 1e-6


def test_default_rule_materializes_small_layers_only(make_model, tokenizer, probes, monkeypatch):
    # 3 rows of T ≤ 36 tokens: R·T·(d_in + d_out) > 2·d_in·d_out for the MLP (64 × 128) and the
    # attention projections, not for lm_head (320 × 64, T ≤ 18 scored positions)
    model = make_model("llama", width=64)
    scope = select_parameters(model, "all")
    shapes = []
    real = ghost.contract._materialized
    monkeypatch.setattr(ghost.contract, "_materialized", lambda o, rows: shapes.append(o.l.shape[-1]) or real(o, rows))
    fast = _chunk_grams(model, tokenizer, probes, scope, ghost_gram_chunk)
    assert shapes and model.config.vocab_size not in shapes  # lm_head stays ghost
    exact = _chunk_grams(model, tokenizer, probes, scope, exact_gram_chunk)
    assert all(_rel(g, e) <= 1e-6 for g, e in zip(fast, exact))


def test_zero_cotangent_positions_are_dropped_only_when_they_pay():
    d = torch.randn(3, 16, 5, dtype=torch.float64)
    x = torch.randn(3, 16, 4, dtype=torch.float64)
    d[:, 10:] = 0  # 6 of 16 positions: every row's cotangent zero
    d[:, 2, 0] = 0  # a candidate (first feature zero) that is not all zero
    kx, kd = ghost.kinds._nonzero_positions(x, d)
    assert kd.shape == (3, 10, 5) and torch.equal(kd, d[:, :10]) and torch.equal(kx, x[:, :10])
    d[:, 11:] = 1.0  # one zero position of 16 (< 1/8): nothing is copied
    kx, kd = ghost.kinds._nonzero_positions(x, d)
    assert kx is x and kd is d


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_head_over_every_position_drops_the_unscored_ones(make_model, tokenizer, probes, arch, monkeypatch):
    # without logits_to_keep the head sees every position, its cotangent zero over prompts and padding
    model = make_model(arch, tie=arch == "gpt2")
    scope = select_parameters(model, "all")
    exact = _chunk_grams(model, tokenizer, probes, scope, exact_gram_chunk, padding_side="left")
    monkeypatch.setattr(ms.dynamics.scoring, "_keeps_scored_logits", lambda m: False)
    kept = []
    real = ghost.kinds._nonzero_positions
    monkeypatch.setattr(ghost.layers.linear, "_nonzero_positions",
                        lambda x, d: kept.append((d.shape[1], (r := real(x, d))[1].shape[1])) or r)
    fast = _chunk_grams(model, tokenizer, probes, scope, ghost_gram_chunk, padding_side="left")
    assert any(after < before for before, after in kept)  # the head's unscored positions went
    assert all(_rel(g, e) <= 1e-6 for g, e in zip(fast, exact))


class ReusedHeadLM(nn.Module):
    """Adds a direct functional use of lm_head.weight next to the lm_head module call."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, **kwargs):
        out = self.lm(output_hidden_states=True, **kwargs)
        return CausalLMOutput(logits=out.logits + F.linear(out.hidden_states[-1], self.lm.lm_head.weight))


def test_unsupported_parameters_raise_and_auto_falls_back(make_model, tokenizer, probes):
    model = ScaledLM(make_model("llama"))
    hooks = _hooks(model)
    scope = select_parameters(model, "all")
    assert not ghost_supports(model, scope)
    assert ghost_supports(model, select_parameters(model, r"^lm\."))
    with pytest.raises(ms.MarginscopeError, match=r"cannot attribute scale \(ScaledLM"):
        ms.dynamics.measure(model, tokenizer, probes, params="all", engine="ghost")
    auto = ms.dynamics.measure(model, tokenizer, probes, params="all")
    assert auto.engine == "exact"
    assert ms.dynamics.measure(model, tokenizer, probes, params=r"^lm\.").engine == "ghost"
    assert _hooks(model) == hooks


def test_direct_functional_use_is_detected(make_model, tokenizer, probes):
    model = ReusedHeadLM(make_model("llama"))
    model(input_ids=torch.tensor([[1, 5]]))  # HF installs its hidden-state hooks on first use
    hooks = _hooks(model)
    scope = select_parameters(model, r"lm_head|norm")
    assert ghost_supports(model, scope)  # statically fine; the graph check catches it
    with pytest.raises(ms.MarginscopeError, match=r"lm\.lm_head\.weight is used outside the modules"):
        ms.dynamics.measure(model, tokenizer, probes, params=r"lm_head|norm", engine="ghost")
    assert ms.dynamics.measure(model, tokenizer, probes, params=r"norm").engine == "ghost"
    assert _hooks(model) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_auto_picks_ghost_and_model_is_left_untouched(make_model, tokenizer, probes):
    model = make_model("gpt2")
    model.train()
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    hooks = _hooks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all")
    assert geo.engine == "ghost"
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert _hooks(model) == hooks
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None, n


def test_hooks_removed_on_error(make_model, tokenizer, probes):
    model = make_model("llama")
    hooks = _hooks(model)
    scope = select_parameters(model, "all")
    rows = [r for e in encode(tokenizer, probes) for r in e.rows()]
    with pytest.raises(RuntimeError, match="boom"), gradient_scope(model, scope):
        with GhostCollector(model, scope, [[0, 1]]):
            score_rows(model, rows)
            raise RuntimeError("boom")
    assert _hooks(model) == hooks
    with pytest.raises(ms.MarginscopeError, match="same batch"), gradient_scope(model, scope):
        with GhostCollector(model, scope, [[0, 99]]):
            score_rows(model, rows)
    assert _hooks(model) == hooks


def _train_step_grams(model, tokenizer, probes, scope, row_scale=None):
    """The in-run use: a train-mode forward, a weighted loss and the trainer's own backward."""
    encoded = encode(tokenizer, probes)
    rows = [r for e in encoded for r in e.rows()]
    groups = [list(range(3 * k, 3 * k + 3)) for k in range(len(encoded))]
    with GhostCollector(model, scope, groups, row_scale=row_scale) as collector:
        logp = score_rows(model, rows, padding_side="left").logp
        loss = logp.sum() if row_scale is None else (row_scale * logp).sum()
        collector.check_attribution(loss)
        torch.autograd.grad(loss, scope.params)
    return collector.grams


def test_non_reentrant_checkpointing_in_train_mode(make_model, tokenizer, probes):
    model = make_model("llama")
    assert model.config.attention_dropout == 0.0
    scope = select_parameters(model, "all")
    exact = _chunk_grams(model, tokenizer, probes, scope, exact_gram_chunk, padding_side="left")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    hooks = _hooks(model)
    seen = []  # a pre-hook: the recomputation stops early, right after the last saved tensor
    counter = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *a: seen.append(1))
    scale = torch.tensor([0.5, -2.0, 1.0, 3.0, 0.25, -1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    grams = _train_step_grams(model, tokenizer, probes, scope, row_scale=scale)
    counter.remove()
    assert len(seen) == 2  # the forward and its recomputation in the backward
    assert all(_rel(g, e) <= 1e-6 for g, e in zip(grams[:2], exact[:2]))
    assert torch.isnan(grams[2][2]).all() and torch.isnan(grams[2][:, 2]).all()  # zero scale
    assert _rel(grams[2][:2, :2], exact[2][:2, :2]) <= 1e-6
    assert _hooks(model) == hooks and all(p.grad is None for p in model.parameters())


def test_reentrant_checkpointing_is_rejected(make_model, tokenizer, probes):
    model = make_model("llama")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    hooks = _hooks(model)
    with pytest.raises(ms.MarginscopeError, match="reentrant gradient checkpointing"):
        _train_step_grams(model, tokenizer, probes, select_parameters(model, "all"))
    assert _hooks(model) == hooks


def test_bfloat16_model_matches_exact_on_the_same_model(make_model, tokenizer, probes):
    model = make_model("llama", dtype=torch.bfloat16)
    exact, fast = _both(model, tokenizer, probes, params="all", batch_size=3)
    assert fast.gram.dtype == np.float64
    # both engines see the same bf16 activations and cotangents; only the rounding of the exact
    # engine's bf16 weight gradients differs
    assert _rel(fast.gram, exact.gram) <= 5e-3
    np.testing.assert_allclose(fast.cosine, exact.cosine, atol=5e-3)
