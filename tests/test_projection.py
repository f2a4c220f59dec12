"""The projected (JL sketch) tier against the exact engine: error shrinking with dim and vanishing when
nothing is projected, unbiasedness over seeds (tied parameters included), determinism, no side
effects, bf16 and in-run use."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import marginscope as ms
from marginscope.dynamics import encode, score_rows, select_parameters
from marginscope.dynamics import projection as proj
from marginscope.dynamics.exact import exact_gram_chunk, gradient_scope
from marginscope.dynamics.ghost import Dense, Outer, ghost_gram_chunk
from marginscope.dynamics.projection import (
    Block,
    ProjectionCollector,
    projected_gram_chunk,
    projection,
    sketch_factor,
    sketch_layout,
    sketch_sides,
)

SEEDS = range(6)


def _run(model, tokenizer, probes, scope, engine, **kwargs):
    with gradient_scope(model, scope):
        return engine(model, encode(tokenizer, probes), scope, **kwargs)


def _cosine(k: torch.Tensor) -> torch.Tensor:
    d = k.diagonal().sqrt()
    return k / d[:, None] / d[None, :]


def _cosine_error(grams, exact) -> float:
    """Mean |cosine error| over the off-diagonal entries of every probe's Gram."""
    off = ~torch.eye(exact[0].shape[0], dtype=torch.bool)
    return float(torch.stack([(_cosine(g) - _cosine(e)).abs()[off] for g, e in zip(grams, exact)]).mean())


def _frobenius_error(grams, exact) -> float:
    return float(np.mean([torch.linalg.norm(g - e) / torch.linalg.norm(e) for g, e in zip(grams, exact)]))


def test_sketch_sides():
    assert sketch_sides((320, 32), 64) == (8, 8)
    assert sketch_sides((32, 320), 1024) == (32, 32)  # the small side is left unprojected
    assert sketch_sides((320, 32), 4096) == (128, 32)
    assert sketch_sides((320, 32), 10240) == (320, 32)  # exact
    assert sketch_sides((5,), 2) is None
    with pytest.raises(ms.MarginscopeError, match="dim must be"):
        sketch_layout(select_parameters(torch.nn.Linear(2, 2), "all"), 0)


def test_sketch_of_every_factor_form_is_p_l_g_p_mt():
    """Token ids, a dense l and a materialized gradient of one G all give P_l G P_mᵀ."""
    gen = torch.Generator().manual_seed(0)
    b, t, d_l, d_m = 2, 5, 7, 6
    ids = torch.randint(d_l, (b, t), generator=gen)
    m = torch.randn(b, t, d_m, generator=gen, dtype=torch.float64)
    one_hot = F.one_hot(ids, d_l).to(torch.float64)
    g = torch.einsum("btl,btm->blm", one_hot, m)
    block = Block("w", (d_l, d_m), (3, 4), 0, 12)
    p_l, p_m = projection(0, "w", "l", 3, d_l), projection(0, "w", "m", 4, d_m)
    expected = (p_l @ g @ p_m.T).flatten(1)
    for u in (Outer(ids, m), Outer(one_hot, m), Dense(g.flatten(1))):
        torch.testing.assert_close(sketch_factor(u, block, p_l, p_m), expected, rtol=1e-12, atol=1e-12)
    assert projection(0, "w", "l", d_l, d_l) is None


class Gate(nn.Module):
    """A leaf module of no known kind using the embedding table: a 2-D gradient materialized per row
    (Dense) and summed with the embedding's (token ids) in one block."""

    def __init__(self, table: nn.Parameter):
        super().__init__()
        self.table = table

    def forward(self, x):
        return x + 0.1 * torch.softmax(x @ self.table.T, -1) @ self.table


@pytest.mark.parametrize("arch,side", [("gpt2", "right"), ("llama", "left"), ("llama", "right")])
def test_error_shrinks_with_dim_and_vanishes_unprojected(make_model, tokenizer, probes, arch, side):
    model = make_model(arch)  # gpt2: lm_head tied to wte
    scope = select_parameters(model, "all")
    exact = _run(model, tokenizer, probes, scope, exact_gram_chunk, padding_side=side)[1]
    errors = {}
    for dim in (64, 1024, 4096):
        runs = [_run(model, tokenizer, probes, scope, projected_gram_chunk, dim=dim, seed=s,
                     padding_side=side) for s in SEEDS]
        for _, grams, sketches in runs:
            assert [s.shape for s in sketches] == [(3, sketch_layout(scope, dim)[-1].stop)] * len(probes)
            for g, s in zip(grams, sketches):
                assert g.dtype == torch.float64 and torch.allclose(g, s @ s.T, rtol=1e-12, atol=0)
        errors[dim] = (np.mean([_cosine_error(r[1], exact) for r in runs]),
                       np.mean([_frobenius_error(r[1], exact) for r in runs]))
    assert errors[64][0] > 2 * errors[1024][0] > 2 * errors[4096][0]
    assert errors[64][1] > errors[1024][1] > errors[4096][1]
    assert errors[4096][0] < 0.03 and errors[4096][1] < 0.1
    # dim ≥ every parameter's numel: no side is projected and the sketches are the gradients
    whole = max(p.numel() for p in scope.params)
    grams = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=whole, padding_side=side)[1]
    assert _frobenius_error(grams, exact) < 1e-10


def test_matrix_gradient_materialized_by_a_generic_module(make_model, tokenizer, probes):
    model = make_model("llama")
    model.model.norm = nn.Sequential(model.model.norm, Gate(model.model.embed_tokens.weight))
    scope = select_parameters(model, "all")
    exact = _run(model, tokenizer, probes, scope, exact_gram_chunk)[1]
    whole = max(p.numel() for p in scope.params)
    assert _frobenius_error(_run(model, tokenizer, probes, scope, projected_gram_chunk, dim=whole)[1],
                            exact) < 1e-10
    runs = [_run(model, tokenizer, probes, scope, projected_gram_chunk, dim=1024, seed=s)[1] for s in SEEDS]
    assert np.mean([_cosine_error(r, exact) for r in runs]) < 0.05


def _estimates(model, tokenizer, probes, scope, n: int) -> torch.Tensor:
    """[n, N, R, R] Gram estimates at dim=16 for seeds 0..n-1."""
    return torch.stack([torch.stack(_run(model, tokenizer, probes, scope, projected_gram_chunk,
                                         dim=16, seed=s)[1]) for s in range(n)])


def _z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(mean − exact) / (sample std / √n) for every upper-triangle entry."""
    n = estimates.shape[0]
    z = (estimates.mean(0) - exact) / (estimates.std(0) / n ** 0.5)
    rows, cols = torch.triu_indices(exact.shape[-1], exact.shape[-1])
    return z[:, rows, cols]


def test_unbiased_over_seeds_with_tied_uses(make_model, tokenizer, probes, monkeypatch):
    """The mean estimate over seeds converges to the exact Gram of the tied wte/lm_head parameter: each
    entry's z-score stays within a Bonferroni bound (family error 1e-3); projecting the two uses
    independently (the cross terms then average to zero) is detected by the same test."""
    model = make_model("gpt2")
    scope = select_parameters(model, r"^transformer\.wte\.")
    exact = torch.stack(_run(model, tokenizer, probes, scope, exact_gram_chunk)[1])
    n = 256
    estimates = _estimates(model, tokenizer, probes, scope, n)
    z = _z_scores(estimates, exact)
    bound = NormalDist().inv_cdf(1 - 1e-3 / (2 * z.numel()))
    assert z.abs().max() < bound
    scale = exact.diagonal(dim1=-2, dim2=-1).sqrt()
    sem = estimates.std(0) / n ** 0.5 / (scale[..., :, None] * scale[..., None, :])
    assert 0 < sem.max() < 0.05  # seeds do vary, and the test resolves a bias of a few percent

    real, uses = proj.projection, iter(range(1, 1 << 30))
    monkeypatch.setattr(proj, "projection", lambda seed, *a: real(seed * (1 << 20) + next(uses), *a))
    assert _z_scores(_estimates(model, tokenizer, probes, scope, n), exact).abs().max() > bound


def _hooks(model) -> dict[str, list[int]]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return {f"{name}.{k}": list(getattr(m, k)) for name, m in model.named_modules() for k in kinds
            if getattr(m, k)}


def test_deterministic_and_free_of_side_effects(make_model, tokenizer, probes):
    model = make_model("llama", tie=True)
    model.train()
    scope = select_parameters(model, "all")
    hooks = _hooks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    first = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=64, seed=3)[2]
    again = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=64, seed=3)[2]
    other = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=64, seed=4)[2]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.allclose(a, b) for a, b in zip(first, other))
    assert model.training and _hooks(model) == hooks
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None, n
    # projections belong to (seed, parameter), not to the call: one probe per chunk, other paddings
    with gradient_scope(model, scope):
        alone = [projected_gram_chunk(model, [probe], scope, dim=64, seed=3, padding_side="left")[2][0]
                 for probe in encode(tokenizer, probes)]
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(first, alone))


def test_bfloat16_model_unprojected_equals_ghost(make_model, tokenizer, probes):
    model = make_model("llama", dtype=torch.bfloat16)
    scope = select_parameters(model, "all")
    ghost = _run(model, tokenizer, probes, scope, ghost_gram_chunk)[1]
    whole = max(p.numel() for p in scope.params)
    grams = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=whole)[1]
    assert _frobenius_error(grams, ghost) < 1e-6  # ghost takes bf16 feature dot products in float32
    sketched = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=256)
    assert all(s.dtype == torch.float64 and torch.isfinite(s).all() for s in sketched[2])
    assert _cosine_error(sketched[1], ghost) < 0.2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.linalg.norm(a - b) <= 1e-6 * torch.linalg.norm(b))


def test_in_run_with_row_scale(make_model, tokenizer, probes):
    """A weighted train-mode backward: row i's sketch is divided by its scale, NaN where it is 0."""
    model = make_model("qwen2")
    scope = select_parameters(model, "all")
    reference = _run(model, tokenizer, probes, scope, projected_gram_chunk, dim=128, seed=1,
                     padding_side="left")[2]
    encoded = encode(tokenizer, probes)
    rows = [r for e in encoded for r in e.rows()]
    groups = [list(range(3 * k, 3 * k + 3)) for k in range(len(encoded))]
    scale = torch.tensor([0.5, -2.0, 1.0, 3.0, 0.25, -1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    model.train()
    with ProjectionCollector(model, scope, groups, row_scale=scale, dim=128, seed=1) as collector:
        loss = (scale * score_rows(model, rows, padding_side="left").logp).sum()
        collector.check_attribution(loss)
        torch.autograd.grad(loss, scope.params)
    sketches, grams = collector.sketches, collector.grams
    # scaling a row's cotangent by 3 is not exact in floating point and the tiny model's backward
    # amplifies the rounding (the ghost engine's Grams move by ~1e-9 too)
    assert all(_close(s, r) for s, r in zip(sketches[:2], reference[:2]))
    assert _close(sketches[2][:2], reference[2][:2])
    assert torch.isnan(sketches[2][2]).all() and torch.isnan(grams[2][2]).all()
    assert torch.isnan(grams[2][:, 2]).all() and torch.isfinite(grams[2][:2, :2]).all()


def test_measure_projected_engine(make_model, tokenizer, probes):
    model = make_model("gpt2")
    exact = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="exact")
    full = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="projected", projection_dim=1 << 20)
    assert full.engine == "projected"
    np.testing.assert_allclose(full.gram, exact.gram, rtol=1e-9)
    small = ms.dynamics.measure(model, tokenizer, probes, params="all", engine="projected", projection_dim=256)
    assert not np.allclose(small.gram, exact.gram, rtol=1e-6)
    np.testing.assert_allclose(small.logp, exact.logp, rtol=1e-12)
