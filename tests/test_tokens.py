"""Per-token Gram tiers (head, tail, exact) against per-token-backward oracles restricted to each tier's
parameters, the torch.func per-token oracle, chunking, the sequence-level Gram, an analytic check of
the head tier, bf16, errors and a model left exactly as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

import marginscope as ms
from marginscope.dynamics import encode, select_parameters
from marginscope.dynamics import tokens
from marginscope.dynamics.exact import exact_token_gram, gradient_scope
from oracles import ScaledLM, oracle_token_gram

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
# each tier's parameters by name, written out per architecture (gpt2: of the untied copy)
TIER_PARAMS = {
    "head": {"gpt2": r"^lm_head\.weight$", "llama": r"^lm_head\.", "qwen2": r"^lm_head\.",
             "gpt_neox": r"^lm_head\."},
    "tail": {"gpt2": r"^transformer\.h\.1\.(ln_2|mlp)\.|^transformer\.ln_f\.|^lm_head\.weight$",
             "llama": r"^model\.layers\.1\.(post_attention_layernorm|mlp)\.|^model\.norm\.|^lm_head\.",
             "qwen2": r"^model\.layers\.1\.(post_attention_layernorm|mlp)\.|^model\.norm\.|^lm_head\.",
             "gpt_neox": r"^gpt_neox\.layers\.1\.(post_attention_layernorm|mlp)\.|^gpt_neox\.final_layer_norm\."
                         r"|^lm_head\."},
    "exact": {arch: "all" for arch in ARCHS},
}


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _untied(model):
    """A copy of a tied gpt2 whose lm_head.weight is its own parameter with the same values."""
    copy_ = copy.deepcopy(model)
    copy_.config.tie_word_embeddings = False
    copy_.lm_head.weight = nn.Parameter(copy_.transformer.wte.weight.detach().clone())
    assert copy_.lm_head.weight is not copy_.transformer.wte.weight
    return copy_


def _oracle(model, encoded, params, side):
    """exact_token_gram (one backward per token) over `params` for every probe."""
    scope = select_parameters(model, params)
    with gradient_scope(model, scope):
        return [exact_token_gram(model, e, scope, padding_side=side) for e in encoded]


def _hooks(model) -> dict[str, list[int]]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return {f"{name}.{k}": list(getattr(m, k)) for name, m in model.named_modules() for k in kinds
            if getattr(m, k)}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tier", tokens.TIERS)
def test_tier_equals_oracle_restricted_to_its_parameters(make_model, tokenizer, probes, tier, arch, side):
    model = make_model(arch)  # gpt2 is tied: its head and tail cover only the head use of wte
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", per_token=tier, padding_side=side)
    assert geo.per_token == tier and geo.engine == "ghost"
    reference = _untied(model) if arch == "gpt2" and tier != "exact" else model
    expected = _oracle(reference, geo.encoded, TIER_PARAMS[tier][arch], side)
    for n, (pid, (g, sq_w, sq_l)) in enumerate(zip(geo.probe_ids, expected)):
        assert geo.token_gram[pid].shape == g.shape == tuple(geo.lengths[n, :2])
        assert _rel(geo.token_gram[pid], g) <= 1e-6
        assert _rel(geo.token_sqnorm[pid][0], sq_w) <= 1e-6 and _rel(geo.token_sqnorm[pid][1], sq_l) <= 1e-6
        if tier == "exact":  # per-token gradients sum to the sequence gradient: Σ_t Σ_s G[t,s] = K[w,l]
            # (to ~1e-8 only: HF's RMSNorm computes in float32 even in a float64 model)
            assert geo.token_gram[pid].sum() == pytest.approx(geo.gram[n, 0, 1], rel=1e-6)


def test_tiers_nest_and_differ(make_model, tokenizer, probes):
    """head ⊂ tail ⊂ exact as sets of (distinct, untied) parameters: the squared norms strictly grow."""
    model = make_model("llama")
    sq = {t: ms.dynamics.measure(model, tokenizer, probes, params="all", per_token=t).token_sqnorm["p0"][0]
          for t in tokens.TIERS}
    assert np.all(sq["head"] < sq["tail"]) and np.all(sq["tail"] < sq["exact"])


def test_exact_tier_tied_gpt2_matches_torch_func_per_token_gradients(make_model, tokenizer, probes):
    model = make_model("gpt2")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="exact", padding_side="left")
    names = select_parameters(model, "all").names
    for n, pid in enumerate(geo.probe_ids):
        prompt = geo.input_ids(n, 0)[0].tolist()
        w, l = geo.input_ids(n, "chosen")[1].tolist(), geo.input_ids(n, "rejected")[1].tolist()
        assert _rel(geo.token_gram[pid], oracle_token_gram(model, names, prompt, w, l)[0].numpy()) <= 1e-6


def test_exact_tier_lora_trainable_scope(make_model, tokenizer, probes):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama"), config)
    scope = select_parameters(model, "trainable")
    assert scope.names and all("lora_" in n for n in scope.names)
    for side in ("right", "left"):
        geo = ms.dynamics.measure(model, tokenizer, probes, per_token="exact", padding_side=side)
        assert geo.engine == "ghost"
        expected = _oracle(model, geo.encoded, "trainable", side)
        for n, (pid, (g, sq_w, _)) in enumerate(zip(geo.probe_ids, expected)):
            assert _rel(geo.token_gram[pid], g) <= 1e-6 and _rel(geo.token_sqnorm[pid][0], sq_w) <= 1e-6
            assert geo.token_gram[pid].sum() == pytest.approx(geo.gram[n, 0, 1], rel=1e-6)
    with pytest.raises(ms.MarginscopeError, match=r"per_token='head': no parameter of the scope"):
        ms.dynamics.measure(model, tokenizer, probes, per_token="head")


def test_exact_tier_chunking_covers_every_block(make_model, tokenizer, probes, monkeypatch):
    model = make_model("gpt2")
    scope = select_parameters(model, "all")
    probe = encode(tokenizer, probes)[0]  # 2 chosen and 18 rejected tokens
    blocks = []
    real = tokens._block_gram

    def counted(graphs, pair, *rest):
        blocks.append(len(pair[0]) + len(pair[1]))
        return real(graphs, pair, *rest)

    monkeypatch.setattr(tokens, "_block_gram", counted)
    with gradient_scope(model, scope):
        whole = tokens.token_gram(model, probe, scope, "exact", padding_side="left")
        assert blocks == [20]
        for k in (1, 3, 7):
            blocks.clear()
            chunked = tokens.token_gram(model, probe, scope, "exact", padding_side="left",
                                        max_tokens_per_chunk=k)
            assert len(blocks) > 1 and max(blocks) <= max(k, 2)
            for a, b in zip(chunked, whole):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_blocks_pair_chosen_and_rejected_tokens():
    for t_w, t_l, k in [(2, 18, 3), (18, 2, 5), (5, 5, 2), (1, 1, 1), (3, 4, 100), (7, 9, 6)]:
        blocks_w, blocks_l = tokens._blocks(t_w, t_l, k)
        assert [t for b in blocks_w for t in b] == list(range(t_w))
        assert [t for b in blocks_l for t in b] == list(range(t_l))
        assert max(len(bw) for bw in blocks_w) + max(len(bl) for bl in blocks_l) <= max(k, 2)
        if t_w + t_l <= k:
            assert len(blocks_w) == len(blocks_l) == 1


def test_head_tier_uniform_prediction(make_model, tokenizer):
    """Head weight zeroed → uniform prediction over M tokens: Δ_t = e_{y_t} − 1/M, so per token pair
    G[t,s] = (h_t·h_s)([w_t = l_s] − 1/M) and ‖g_t‖² = ‖h_t‖²(1 − 1/M) (margin-pitfalls Theorem 1,
    per token pair)."""
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    probes = ms.probes.ProbeSet.from_records([
        {"id": "a", "prompt": "The movie was", "chosen": " good and bad", "rejected": " bad, not good"},
        {"id": "b", "prompt": "Bad", "chosen": " no", "rejected": " yes it is no"}])
    geo = ms.dynamics.measure(model, tokenizer, probes, params=r"^lm_head\.", per_token="head")
    m = model.config.vocab_size
    captured = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0][0].double()))
    same = 0
    for n, pid in enumerate(geo.probe_ids):
        prompt, w = geo.input_ids(n, "chosen")
        l = geo.input_ids(n, "rejected")[1]
        h = {}
        for name, ids in (("w", w), ("l", l)):
            captured.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([[*prompt, *ids]]))
            h[name] = captured[0][len(prompt) - 1:len(prompt) - 1 + len(ids)]
        expected = (h["w"] @ h["l"].T).numpy() * ((w[:, None] == l[None, :]) - 1 / m)
        same += int((w[:, None] == l[None, :]).sum())
        np.testing.assert_allclose(geo.token_gram[pid], expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(geo.token_sqnorm[pid][0], (h["w"] ** 2).sum(1).numpy() * (1 - 1 / m),
                                   rtol=1e-9)
    hook.remove()
    assert same >= 2  # both branches of [w_t = l_s] are exercised


@pytest.mark.parametrize("tier", tokens.TIERS)
def test_bfloat16_model_matches_float64_of_the_same_weights(make_model, tokenizer, probes, tier):
    bf16 = make_model("llama", dtype=torch.bfloat16)
    geo = ms.dynamics.measure(bf16, tokenizer, probes, params="all", per_token=tier)
    ref = ms.dynamics.measure(copy.deepcopy(bf16).to(torch.float64), tokenizer, probes, params="all",
                              per_token=tier)
    for pid in geo.probe_ids:  # G itself is a near-cancellation (cosines ~1e-2): compare norms and cosines
        assert geo.token_gram[pid].dtype == np.float64
        for sq, sq_ref in zip(geo.token_sqnorm[pid], ref.token_sqnorm[pid]):
            np.testing.assert_allclose(sq, sq_ref, rtol=2e-2)
        np.testing.assert_allclose(geo.token_cosine(pid), ref.token_cosine(pid), atol=1e-2)


def test_dispatch_fast_path_for_ghost_oracle_for_exact(make_model, tokenizer, probes, monkeypatch):
    model = make_model("qwen2")
    used = []
    for name in ("batched_token_gram", "positionwise_token_gram"):
        real = getattr(tokens, name)
        monkeypatch.setattr(tokens, name,
                            lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    fast = ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="exact")
    assert used == ["batched_token_gram"] * 3
    used.clear()
    oracle = ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="exact", engine="exact")
    assert not used and oracle.engine == "exact"
    for pid in fast.probe_ids:
        assert _rel(fast.token_gram[pid], oracle.token_gram[pid]) <= 1e-6
    ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="tail", engine="exact")
    assert used == ["positionwise_token_gram"] * 3


def test_errors(make_model, tokenizer, probes):
    model = make_model("llama")
    with pytest.raises(ms.MarginscopeError, match="per_token must be one of None, 'head', 'tail', 'exact'"):
        ms.dynamics.measure(model, tokenizer, probes, per_token="all")
    with pytest.raises(ms.MarginscopeError, match=r"per_token='head': no parameter of the scope \(regex:"):
        ms.dynamics.measure(model, tokenizer, probes, params=r"layers\.1\.mlp", per_token="head")
    with pytest.raises(ms.MarginscopeError, match=r"per_token='tail': no parameter of the scope"):
        ms.dynamics.measure(model, tokenizer, probes, params=r"layers\.0\.|embed", per_token="tail")
    # a tail-only scope: the tail tier is the whole gradient there, so it equals the exact tier
    tail_only = TIER_PARAMS["tail"]["llama"]
    tail = ms.dynamics.measure(model, tokenizer, probes, params=tail_only, per_token="tail")
    exact = ms.dynamics.measure(model, tokenizer, probes, params=tail_only, per_token="exact")
    assert all(_rel(tail.token_gram[p], exact.token_gram[p]) <= 1e-9 for p in tail.probe_ids)


def test_unattributable_parameters_scaled_logits_and_head_bias(make_model, tokenizer, probes):
    """The exact tier raises on a parameter it cannot attribute; the head tier covers its own module
    (weight and bias) with Δ read off the backward, so the wrapper's scaling of the logits is in it."""
    lm = make_model("llama")
    lm.lm_head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, dtype=torch.float64)  # with a bias
    model = ScaledLM(lm)
    scope = select_parameters(model, "all")
    probe = encode(tokenizer, probes)[1]
    with gradient_scope(model, scope), pytest.raises(ms.MarginscopeError, match=r"cannot attribute scale"):
        tokens.token_gram(model, probe, scope, "exact")
    geo = ms.dynamics.measure(model, tokenizer, probes, params="all", per_token="head")
    assert geo.engine == "exact"
    expected = _oracle(model, geo.encoded, r"^lm\.lm_head\.", "right")
    assert all(_rel(geo.token_gram[p], g) <= 1e-6 for p, (g, _, _) in zip(geo.probe_ids, expected))


@pytest.mark.parametrize("tier", tokens.TIERS)
def test_model_left_untouched(make_model, tokenizer, probes, tier):
    model = make_model("gpt2")
    model.train()
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)
    model.transformer.ln_f.weight.grad = torch.full_like(model.transformer.ln_f.weight, 3.0)
    hooks = _hooks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    ms.dynamics.measure(model, tokenizer, probes, params="all", per_token=tier)
    assert model.training and torch.equal(torch.get_rng_state(), rng) and _hooks(model) == hooks
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
        assert (p.grad is None) == (n != "transformer.ln_f.weight"), n
    assert torch.equal(model.transformer.ln_f.weight.grad, torch.full_like(model.transformer.ln_f.weight, 3.0))


def _per_row_gradients(o, k, vocab):
    """Oracle: the [K, dim_l·dim_m] per-row gradients Σ_t l_t ⊗ m_t of a virtual-row factor, built
    explicitly (a one-hot l scattered into a vocab-row table; shared sides broadcast)."""
    m = o.m.double().expand(k, -1, -1)
    if o.ids:
        table = torch.zeros(k, vocab, m.shape[-1], dtype=torch.float64)
        for t, i in enumerate(o.l[0].tolist()):
            table[:, i] += m[:, t]
        return table.flatten(1)
    return torch.einsum("ktl,ktm->klm", o.l.double().expand(k, -1, -1), m).flatten(1)


@pytest.mark.parametrize("materialize", [None, True, False])
def test_virtual_pair_equals_explicit_per_row_gradients(materialize):
    """Every factor combination the exact tier meets (Linear l = D, Conv1D l = X, ids, a tied head's D
    against ids, materialized Dense), blocks and paired diagonals, against explicit gradients."""
    from marginscope.dynamics.ghost import Dense, Outer, virtual_pair
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    vocab, t, s = 11, 5, 7
    ids_w, ids_l = torch.randint(0, vocab, (1, t), generator=gen), torch.randint(0, vocab, (1, s), generator=gen)
    for k_w, k_l in ((3, 4), (1, 4), (1, 1)):
        cases = {  # name: (factor on w's k_w rows over t tokens, factor on l's k_l rows over s tokens)
            "linear": (Outer(r(k_w, t, 6), r(1, t, 9)), Outer(r(k_l, s, 6), r(1, s, 9))),
            "conv1d": (Outer(r(1, t, 9), r(k_w, t, 6)), Outer(r(1, s, 9), r(k_l, s, 6))),
            "embedding": (Outer(ids_w, r(k_w, t, 6)), Outer(ids_l, r(k_l, s, 6))),
            "tied head × embedding": (Outer(r(k_w, t, vocab), r(1, t, 6)), Outer(ids_l, r(k_l, s, 6))),
            "embedding × tied head": (Outer(ids_w, r(k_w, t, 6)), Outer(r(k_l, s, vocab), r(1, s, 6))),
            "dense × embedding": (Dense(r(k_w, vocab * 6)), Outer(ids_l, r(k_l, s, 6))),
            "linear × dense": (Outer(r(k_w, t, 6), r(1, t, 9)), Dense(r(k_l, 54))),
            "dense": (Dense(r(k_w, 8)), Dense(r(k_l, 8))),
        }
        for name, (u, v) in cases.items():
            gu = u.g if isinstance(u, Dense) else _per_row_gradients(u, k_w, vocab)
            gv = v.g if isinstance(v, Dense) else _per_row_gradients(v, k_l, vocab)
            block = virtual_pair(u, v, paired=False, materialize=materialize)
            torch.testing.assert_close(block, gu @ gv.T, rtol=1e-12, atol=1e-12, msg=name)
            for f, g in ((u, gu), (v, gv)):
                torch.testing.assert_close(virtual_pair(f, f, paired=True, materialize=materialize),
                                           (g * g).sum(-1), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("arch,kwargs", [("gpt2", {}), ("llama", {}), ("qwen2", {}), ("gpt_neox", {}),
                                         ("llama", {"tie": True}), ("lora", {})])
def test_exact_tier_one_row_blocks_equal_oracle(make_model, tokenizer, probes, arch, kwargs, materialize):
    """The exact tier's one-row graphs with only the chosen × rejected block and the diagonals
    contracted, forced ghost or materialized and chunked, against one backward per token (the oracle
    scores both rows in one padded batch, left and right)."""
    if arch == "lora":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False)
        model, params = peft.get_peft_model(make_model("llama"), config), "trainable"
    else:
        model, params = make_model(arch, **kwargs), "all"
    scope = select_parameters(model, params)
    with gradient_scope(model, scope):
        for side, probe in zip(("left", "right", "left"), encode(tokenizer, probes)):
            expected = exact_token_gram(model, probe, scope, padding_side=side)
            rows = [(probe.prompt_ids, probe.response_ids[0]), (probe.prompt_ids, probe.response_ids[1])]
            for k in (None, 3):
                got = tokens.batched_token_gram(model, rows, scope, max_tokens_per_chunk=k, materialize=materialize)
                for a, b in zip(got, expected):
                    assert a.dtype == torch.float64 and a.shape == b.shape
                    assert _rel(a, b) <= 1e-9


class _Wrapped(nn.Module):
    """An LM behind a forward without `logits_to_keep` (full logits, gathered at the scored positions);
    `head`: what get_output_embeddings() returns; `skip`: logits + a linear map of the embeddings' output
    (a path from the body to the log-probs that bypasses the head's input)."""

    def __init__(self, lm, head=True, skip=False):
        super().__init__()
        self.lm, self.config, self.head = lm, lm.config, head
        self.skip = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False, dtype=torch.float64) \
            if skip else None

    def forward(self, **kwargs):
        out = self.lm(**kwargs, output_hidden_states=self.skip is not None)
        logits = out.logits if self.skip is None else out.logits + self.skip(out.hidden_states[0])
        return CausalLMOutput(logits=logits)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings() if self.head else None


@pytest.mark.parametrize("variant,shortcut", [("hf", True), ("full logits", True), ("no head", False),
                                              ("bypass", False)])
def test_exact_tier_truncated_graphs_and_head_shortcut_equal_oracle(make_model, tokenizer, probes, variant,
                                                                    shortcut, monkeypatch):
    """Truncated forwards (one per row, or up to 3 blocks of tokens) with the batched backward started
    at the LM head's input (at the scored positions only, or over the full logits), and the batched
    backward from the log-probs where the head is unknown or bypassed, against one backward per token."""
    lm = make_model("gpt2" if variant != "bypass" else "llama")
    model = {"hf": lm, "full logits": _Wrapped(lm), "no head": _Wrapped(lm, head=False),
             "bypass": _Wrapped(lm, skip=True)}[variant]
    graphs, truncated = [], 0
    real = tokens._row_graph
    monkeypatch.setattr(tokens, "_row_graph", lambda *a: graphs.append(real(*a)) or graphs[-1])
    scope = select_parameters(model, "all")
    with gradient_scope(model, scope):
        for probe in encode(tokenizer, probes)[:2]:
            expected = exact_token_gram(model, probe, scope)
            rows = [(probe.prompt_ids, probe.response_ids[0]), (probe.prompt_ids, probe.response_ids[1])]
            for truncate, k in ((1, None), (3, None), (3, 4)):
                graphs.clear()
                got = tokens.batched_token_gram(model, rows, scope, truncate=truncate, max_tokens_per_chunk=k)
                for a, b in zip(got, expected):
                    assert _rel(a, b) <= 1e-9
                assert all((g.head_input is not None) == shortcut for g in graphs)
                ends = sorted(len(g.scored.mask[0]) for g in graphs)
                assert ends == sorted(b.stop for _, r in rows for b in tokens._truncations(len(probe.prompt_ids),
                                                                                         len(r), truncate))
                truncated += sum(n < max(len(r) for _, r in rows) for n in ends)
    assert truncated >= 4  # forwards that stop before the end of their response


def test_truncations_cover_the_tokens_at_least_cost():
    def cost(blocks, p):
        return sum((p + b.stop) * (tokens.FORWARD_COST + len(b)) for b in blocks)

    for p, t in [(4, 12), (16, 32), (1, 1), (100, 5), (2, 64), (16, 512)]:
        blocks = tokens._truncations(p, t)
        assert [i for b in blocks for i in b] == list(range(t)) and len(blocks) <= tokens.MAX_TRUNCATED_GRAPHS
        for n in range(1, min(t, tokens.MAX_TRUNCATED_GRAPHS) + 1):
            forced = tokens._truncations(p, t, n)
            assert [i for b in forced for i in b] == list(range(t)) and len(forced) == n
            assert cost(blocks, p) <= cost(forced, p)
    assert len(tokens._truncations(16, 32)) == 2 and len(tokens._truncations(100, 5)) == 1
    assert len(tokens._truncations(16, 512)) == tokens.MAX_TRUNCATED_GRAPHS
    assert tokens._truncations(3, 2, 5) == [range(0, 1), range(1, 2)]
