"""Per-token Gram tiers: G[t, s] = ⟨g_w,t, g_l,s⟩ with g_y,t = ∇ log π(y_t | x, y_<t) restricted to a
tier, with the per-token squared norms ‖g_w,t‖², ‖g_l,s‖² (DESIGN.md §1, §3); float64, raw values.

A tier is a set of parameter *usages* (module calls), intersected with the parameter scope: g_y,t is
the sum of the contributions of the tier's calls only, so a parameter used by several calls (GPT-2's
wte, tied to lm_head) counts through its uses in the tier alone.

- "head": the calls of the LM head module `model.get_output_embeddings()` and of its submodules (e.g.
  LoRA adapters), where the ghost engine attributes them; for a tied model that is the head use of the
  tied matrix, not its embedding use. The logits at position τ_t feed token t alone, so the head's
  per-token gradient is δ_t ⊗ h_t at that one position, h_t the head's input and
  δ_t = ∂log π(y_t)/∂logits_τt (e_{y_t} − p_t for plain logits; read off the backward, so scaled or
  soft-capped logits come out right):

      G = (H_w H_lᵀ) ⊙ (Δ_w Δ_lᵀ)   (+ Δ_w Δ_lᵀ for a bias)

  Cost: one forward and a backward of Σ_t log π(y_t) that stops at the head's output.
- "tail": the attributable calls whose forward starts after the last attention module's forward
  returns (attention: a module whose class name contains "Attention", the HF convention), i.e. the
  last block's post-attention norm and MLP, the final norm and the head. GPT-2: h[-1].ln_2,
  h[-1].mlp.c_fc, h[-1].mlp.c_proj, ln_f, lm_head (the tied wte's head use); Llama/Qwen2:
  layers[-1].post_attention_layernorm, layers[-1].mlp.*, norm, lm_head; GPT-NeoX (parallel residual):
  layers[-1].post_attention_layernorm, layers[-1].mlp.*, final_layer_norm, lm_head (embed_out before
  transformers 5). These, and everything between them and the logits, act on each position alone, so
  a use at position τ_t reaches token t only, and in one backward of Σ_t log π(y_t) (stopping at the
  tail's inputs) the contribution of position τ_t is exactly the tail part of g_t. Each scored
  position becomes a virtual row of length one ([B, T, …] → [K, 1, …]) for the ghost handlers.
  Cost: one forward, one backward through the tail.
- "exact": every use of every scope parameter (all of g_t); a scope parameter the ghost engine cannot
  attribute (or one used outside the modules it hooks) raises MarginscopeError. One forward per row
  (batch 1: a token's cotangent is zero on the other row, so backpropagating it through a two-row
  graph would be wasted work); then per chunk of K tokens of a row one `autograd.grad(token log-probs,
  every hooked call's output, one-hot cotangents, is_grads_batched=True)`, which returns each call's
  output cotangents for the K tokens at once ([K, 1, T, d_out]; no tensor hooks: they do not fire
  under vmap). Token k is a virtual row: its own cotangent with its row's inputs, shared
  (`ghost.virtual`). Only the chosen × rejected block and the squared norms are contracted
  (`BlockSums`), each through the shared inputs' token Gram C = X_w X_lᵀ:
  ⟨G_a, G_b⟩ = Σ_t D_a,t · (C D_b)_t. A chunk pairs a block of chosen with a block of rejected tokens,
  so every w × l block is covered; K is `max_tokens_per_chunk`, or what `TOKEN_CHUNK_BYTES` allows.

Head and tail are computed this way whatever the engine; `exact_token_gram` (one backward per token)
is the oracle of all three, restricted to a tier's parameters. Limits: the tail assumes that what runs
after the last attention is position-wise (true of transformer decoders, not of a model that mixes
positions otherwise, e.g. by a convolution or a recurrence, or whose attention classes are not named
so); head and tail leave out scope parameters the ghost engine cannot attribute; head and tail
contract the (T_w + T_l)² Gram of the scored positions at once (over the vocabulary for the head's
cotangents); the exact tier's memory is K per-token copies of every hooked call's output.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import MarginscopeError
from .exact import ParameterScope
from .ghost import BlockSums, Call, CallRecorder, GramSums, Plan, attributable_plan, plan_modules, sequence_mark
from .scoring import EncodedProbe, Row, ScoredRows, score_rows

TIERS = ("head", "tail", "exact")
TOKEN_CHUNK_BYTES = 1 << 30  # default memory budget of one chunk of the exact tier

TokenGram = tuple[Tensor, Tensor, Tensor]  # G [T_w, T_l], ‖g_w,t‖² [T_w], ‖g_l,s‖² [T_l]; float64 CPU
Virtual = tuple[Call, Callable[[], tuple[Call, Tensor]]]  # a recorded call, → (virtual call, cotangent)


def token_gram(model: nn.Module, probe: EncodedProbe, scope: ParameterScope, tier: str, *, w: int = 0,
               l: int = 1, padding_side: str = "right", pad_id: int = 0,
               max_tokens_per_chunk: int | None = None) -> TokenGram:
    """The per-token Gram of responses w and l of `probe` over `tier` ∩ scope (see the module doc),
    with the per-token squared norms. Call inside `gradient_scope`."""
    if tier not in TIERS:
        raise MarginscopeError(f"per-token tier must be one of {', '.join(TIERS)}; got {tier!r}")
    rows = [(probe.prompt_ids, probe.response_ids[w]), (probe.prompt_ids, probe.response_ids[l])]
    if tier == "exact":
        return batched_token_gram(model, rows, scope, padding_side=padding_side, pad_id=pad_id,
                                  max_tokens_per_chunk=max_tokens_per_chunk)
    return positionwise_token_gram(model, rows, scope, tier, padding_side=padding_side, pad_id=pad_id)


# --- head and tail: one backward, a virtual row per scored position ----------------------------------

def _at_positions(call: Call, grad: Tensor, row: Tensor, token: Tensor, pos: Tensor, scored_len: int
                  ) -> tuple[Call, Tensor]:
    """Virtual rows (row_k, position τ_k) as a batch of K rows of length one: every tensor input and
    the cotangent [B, T, …] → [K, 1, …]; tensors without a batch dimension are shared. A call over the
    scored positions only (the LM head of a model that keeps only the scored logits: as many positions
    as the longest response, `scored_len`, fewer than the padded row's) is indexed by token instead."""
    b, t = grad.shape[:2]
    pos = token if t == scored_len else pos

    def pick(x):
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != b:
            return x
        if x.dim() < 2 or x.shape[1] != t:
            raise MarginscopeError(
                f"{type(call.module).__name__} takes an input of shape {list(x.shape)}, not split by position "
                f"like its output {list(grad.shape)}; its per-token gradients need per_token='exact'")
        return x[row.to(x.device), pos.to(x.device)].unsqueeze(1)

    return replace(call, args=tree_map(pick, call.args), kwargs=tree_map(pick, call.kwargs)), pick(grad)


@contextlib.contextmanager
def _attention_marks(model: nn.Module) -> Iterator[list[int]]:
    """Autograd sequence marks taken as each attention module's forward returns."""
    marks: list[int] = []
    handles = [m.register_forward_hook(lambda *_: marks.append(sequence_mark()))
               for m in model.modules() if "Attention" in type(m).__name__]
    try:
        yield marks
    finally:
        for handle in handles:
            handle.remove()


def _head_plan(model: nn.Module, plan: Plan) -> Plan:
    head = model.get_output_embeddings()
    if head is None:
        raise MarginscopeError("per_token='head': the model has no output embeddings "
                               "(get_output_embeddings() is None)")
    modules = set(head.modules())
    return {m: v for m, v in plan.items() if m in modules}


def positionwise_token_gram(model: nn.Module, rows: Sequence[Row], scope: ParameterScope, tier: str, *,
                            padding_side: str = "right", pad_id: int = 0) -> TokenGram:
    """Tier "head" or "tail" of the per-token Gram between rows[0] and rows[1] (module doc)."""
    plan = plan_modules(model, scope)[0]
    plan = _head_plan(model, plan) if tier == "head" else plan
    with CallRecorder(model, scope, plan) as recorder, _attention_marks(model) as marks:
        scored = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id)
    records = recorder.calls
    if tier == "tail":
        if not marks:
            raise MarginscopeError("per_token='tail': no attention module (class name containing "
                                   "'Attention') ran in the forward, so the tail is undefined")
        records = [r for r in records if r.span[0] > max(marks)]
    if not records:
        raise MarginscopeError(f"per_token={tier!r}: no parameter of the scope ({scope.spec}) is used by "
                               f"the {tier} modules the ghost engine attributes")
    grads = torch.autograd.grad(scored.logp.sum(), recorder.outputs(records), allow_unused=True)
    row, token, pos = scored.scored_tokens()
    uses = [(r.call, partial(_at_positions, r.call, g, row, token, pos, scored.mask.shape[1]))
            for r, g in zip(records, grads) if g is not None]
    return _split(_virtual_gram(uses, len(row), scope), len(rows[0][1]))


# --- exact: one-row graphs, batched per-token cotangents, chosen × rejected blocks --------------------

@dataclass
class _RowGraph:
    """One response's own forward (batch 1, no padding): its recorded calls and their outputs."""

    recorder: CallRecorder
    scored: ScoredRows
    outputs: list[Tensor]

    def cotangents(self, tokens: range) -> list[Tensor | None]:
        """Every recorded call's output cotangents for the one-hot cotangents of `tokens`, [K, ...] each
        (one batched activation backward, no parameter gradient)."""
        logp = self.scored.token_logp
        onehot = torch.zeros(len(tokens), *logp.shape, dtype=logp.dtype, device=logp.device)
        onehot[torch.arange(len(tokens), device=logp.device), 0, torch.as_tensor(tokens, device=logp.device)] = 1
        grads = torch.autograd.grad(logp, self.outputs, onehot, retain_graph=True, is_grads_batched=True,
                                    allow_unused=True)
        return [None if g is None else g.flatten(0, 1) for g in grads]


def _row_graph(model: nn.Module, scope: ParameterScope, plan: Plan, row: Row, pad_id: int) -> _RowGraph:
    with CallRecorder(model, scope, plan) as recorder:
        scored = score_rows(model, [row], pad_id=pad_id)
    recorder.check_attribution(scored.logp.sum())
    return _RowGraph(recorder, scored, recorder.outputs(recorder.calls))


def _tokens_per_chunk(per_token: int, width: int, budget: int) -> int:
    """Largest K with K·per_token ≤ budget (the batched cotangents: per_token bytes of hooked outputs
    per token) and 24·(K·width)² ≤ budget (float64 temporaries of the contractions); at least 2."""
    return max(2, min(budget // max(per_token, 1), math.isqrt(budget // 24) // width))


def _blocks(t_w: int, t_l: int, k: int) -> tuple[list[range], list[range]]:
    """Blocks of chosen and of rejected tokens whose pairs hold ≤ max(k, 2) tokens; one each if all fit."""
    k_w = t_w if t_w + t_l <= k else min(t_w, max(1, k // 2))
    k_l = min(t_l, max(1, k - k_w))
    k_w = min(t_w, max(1, k - k_l))
    return ([range(i, min(i + k_w, t_w)) for i in range(0, t_w, k_w)],
            [range(j, min(j + k_l, t_l)) for j in range(0, t_l, k_l)])


def batched_token_gram(model: nn.Module, rows: Sequence[Row], scope: ParameterScope, *,
                       padding_side: str = "right", pad_id: int = 0, max_tokens_per_chunk: int | None = None,
                       materialize: bool | None = None) -> TokenGram:
    """Tier "exact" of the per-token Gram between rows[0] and rows[1] (module doc): one forward per row
    (batch 1, so `padding_side` plays no part), then per (chosen block, rejected block) of at most
    `max_tokens_per_chunk` tokens (default: as many as `TOKEN_CHUNK_BYTES` allows) one batched backward
    per row and the block's contraction (`ghost.virtual`; materialize forces its materialized or
    ghost form, for tests)."""
    plan = attributable_plan(model, scope)
    graphs = [_row_graph(model, scope, plan, row, pad_id) for row in rows]
    t_w, t_l = len(rows[0][1]), len(rows[1][1])
    per_token = max(sum(o.numel() * o.element_size() for o in g.outputs) for g in graphs)
    width = max(len(prompt) + len(response) for prompt, response in rows)
    k = max_tokens_per_chunk or _tokens_per_chunk(per_token, width, TOKEN_CHUNK_BYTES)
    gram = torch.zeros(t_w, t_l, dtype=torch.float64)
    sq_w, sq_l = torch.zeros(t_w, dtype=torch.float64), torch.zeros(t_l, dtype=torch.float64)
    blocks_w, blocks_l = _blocks(t_w, t_l, k)
    only_l = graphs[1].cotangents(blocks_l[0]) if len(blocks_l) == 1 else None
    for i, bw in enumerate(blocks_w):
        cot_w = graphs[0].cotangents(bw)
        for j, bl in enumerate(blocks_l):
            cot_l = only_l if only_l is not None else graphs[1].cotangents(bl)
            g, s_w, s_l = _block_gram(graphs, (bw, bl), (cot_w, cot_l), (j == 0, i == 0), scope, materialize)
            gram[bw.start:bw.stop, bl.start:bl.stop] = g
            if j == 0:
                sq_w[bw.start:bw.stop] = s_w
            if i == 0:
                sq_l[bl.start:bl.stop] = s_l
    return gram, sq_w, sq_l


def _block_gram(graphs: Sequence[_RowGraph], blocks: tuple[range, range], cotangents: tuple[list, list],
                norms: tuple[bool, bool], scope: ParameterScope, materialize: bool | None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One block of chosen × rejected tokens: (G [K_w, K_l], ‖g_w‖² [K_w] or None, ‖g_l‖² [K_l] or None),
    float64 CPU, over every use of every scope parameter in both rows' graphs (a tied parameter's cross
    terms included), from each graph's cotangents for its block's tokens."""
    sums = BlockSums(len(blocks[0]), len(blocks[1]), scope.params[0].device, norms=norms, materialize=materialize)
    uses = [[(r.call, c) for r, c in zip(g.recorder.calls, cot) if c is not None]
            for g, cot in zip(graphs, cotangents)]
    for side, side_uses in enumerate(uses):
        for call, _ in side_uses:
            sums.expect(side, call)
    for n in range(max(map(len, uses))):  # both rows' calls in forward order: a factor is dropped early
        for side, side_uses in enumerate(uses):
            if n < len(side_uses):
                call, grad = side_uses[n]
                factors = call.kind.factors(call, grad)
                for attr, p in call.params:
                    sums.add(side, p, factors[attr], call)
    out = [t if t is None else t.cpu() for t in sums.norms]
    return sums.block.cpu(), out[0], out[1]


# --- contraction --------------------------------------------------------------------------------------

def _virtual_gram(uses: Sequence[Virtual], k: int, scope: ParameterScope) -> Tensor:
    """[K, K] float64 Gram of K virtual rows summed over every use (cross terms of a parameter's uses
    included); each use's virtual call is built when its turn comes, then dropped."""
    sums = GramSums([range(k)], scope.params[0].device)
    for call, _ in uses:
        sums.expect(call)
    for call, virtual in uses:
        vcall, grad = virtual()
        factors = call.kind.factors(vcall, grad)
        for attr, p in call.params:
            sums.add(p, factors[attr], call)
    return sums.sums[0].cpu()


def _split(gram: Tensor, t_w: int) -> TokenGram:
    """A Gram over (chosen tokens, rejected tokens) → (the chosen × rejected block, both diagonals)."""
    d = gram.diagonal()
    return gram[:t_w, t_w:].clone(), d[:t_w].clone(), d[t_w:].clone()
