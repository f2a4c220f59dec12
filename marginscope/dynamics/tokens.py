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
  attribute (or one used outside the modules it hooks) raises MarginscopeError. Forwards of one row
  (batch 1: a token's cotangent is zero on the other row, so backpropagating it through a two-row
  graph would be wasted work), truncated: token t's log-prob does not depend on later positions, so
  each response's tokens are split into up to `MAX_TRUNCATED_GRAPHS` blocks and each block is scored by
  a forward that ends at its last token (`_truncations` picks the split with the least work by a
  count of positions forwarded and backpropagated). Per chunk of K tokens of a block one
  `autograd.grad(·, every hooked call's output, is_grads_batched=True)` returns each call's output
  cotangents for the K tokens at once ([K, 1, T, d_out]; no tensor hooks: they do not fire under
  vmap). It starts at the LM head's input, not at the log-probs: the head acts on each position alone
  and token t reads its logits at one position q_t only, so one plain backward through the head gives
  every token's head-input cotangent (at q_t) and the head calls' own cotangents; the [K, T, V]
  batched backward through the head is never run, and each head call becomes one virtual row of length
  one per token, as in "tail" (`_RowGraph`; where the head is not known or some path from the body to
  the log-probs avoids its input, the batched backward starts at the log-probs). Token k is a virtual
  row: its own cotangent with its row's inputs, shared (`ghost.virtual`); a block's cotangents are
  zero-padded to the positions of the graph that scores the chunk's last token, whose inputs they are
  contracted with (the truncated graphs' positions are a prefix of it, with the same values). Only the
  chosen × rejected block and the squared norms are contracted (`BlockSums`), each through the
  shared inputs' token Gram C = X_w X_lᵀ: ⟨G_a, G_b⟩ = Σ_t D_a,t · (C D_b)_t. A chunk pairs a block
  of chosen with a block of rejected tokens, so every w × l block is covered; K is
  `max_tokens_per_chunk`, or what `TOKEN_CHUNK_BYTES` allows.

Head and tail are computed this way whatever the engine; `exact_token_gram` (one backward per token)
is the oracle of all three, restricted to a tier's parameters. Limits: the tail assumes that what runs
after the last attention is position-wise (true of transformer decoders, not of a model that mixes
positions otherwise, e.g. by a convolution or a recurrence, or whose attention classes are not named
so); head and tail leave out scope parameters the ghost engine cannot attribute; head and tail
contract the (T_w + T_l)² Gram of the scored positions at once (over the vocabulary for the head's
cotangents); the exact tier's memory is K per-token copies of every hooked call's output outside the
head, and up to `MAX_TRUNCATED_GRAPHS` one-row graphs per response.
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


# --- exact: truncated one-row graphs, batched per-token cotangents, chosen × rejected blocks ----------

MAX_TRUNCATED_GRAPHS = 4  # most truncated forwards per response in the exact tier (each graph is held)
FORWARD_COST = 4  # a truncated graph's forward and head backward per position, in batched cotangents:
# (16-token prompt, 32 tokens, GPT-2 widths, 1 thread) 2 graphs per response measured fastest


@dataclass
class _RowGraph:
    """One forward of a response truncated after its first `scored.mask.shape[1]` tokens (batch 1, no
    padding): its recorded calls and their outputs, and, when the LM head shortcut applies
    (`_head_shortcut`), the head's input `head_input` [1, T_h, d] and which calls are the head's."""

    recorder: CallRecorder
    scored: ScoredRows
    outputs: list[Tensor]
    head_input: Tensor | None
    in_head: list[bool]
    _single: list[Tensor | None] | None = None

    def single(self) -> list[Tensor | None]:
        """[d(Σ_t log π_t)/d head_input] + the same for every head call's output, [1, T_h, ...] each:
        one backward through the head. The head acts on each position alone and position q_t scores
        token t alone, so position q_t of these is exactly token t's cotangent."""
        if self._single is None:
            heads = [o for o, h in zip(self.outputs, self.in_head) if h]
            self._single = list(torch.autograd.grad(self.scored.logp.sum(), [self.head_input, *heads],
                                                    retain_graph=True, allow_unused=True))
        return self._single

    def positions(self, tokens: range) -> Tensor:
        """Where tokens feed the head's input: the token index when the head runs at the scored positions
        only (`logits_to_keep`), else the logit position in the row."""
        idx = torch.as_tensor(tokens, device=self.scored.mask.device)
        return idx if self.head_input.shape[1] == self.scored.mask.shape[1] else self.scored.logit_pos[0, idx]

    def cotangents(self, tokens: range) -> list[Tensor | None]:
        """Every recorded call's output cotangents for the one-hot cotangents of the K tokens of `tokens`,
        [K, ...] each (None: no cotangent), no parameter gradient; with the head shortcut a head call's
        entry is its `single` cotangent [1, T_h, ...] instead, token t's at position q_t. With the
        shortcut the one batched backward starts at the head's input, token t's cotangent (from
        `single`) at q_t, so the head's [K, T_h, V] batched backward is never run; else it starts at
        the log-probs."""
        k = len(tokens)
        if self.head_input is None:
            logp = self.scored.token_logp
            onehot = torch.zeros(k, *logp.shape, dtype=logp.dtype, device=logp.device)
            onehot[torch.arange(k, device=logp.device), 0, torch.as_tensor(tokens, device=logp.device)] = 1
            grads = torch.autograd.grad(logp, self.outputs, onehot, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
            return [None if g is None else g.flatten(0, 1) for g in grads]
        single, q, rows = self.single(), self.positions(tokens), torch.arange(k, device=self.head_input.device)

        start = torch.zeros(k, *single[0].shape, dtype=single[0].dtype, device=single[0].device)
        start[rows, 0, q] = single[0][0, q]
        body = [o for o, h in zip(self.outputs, self.in_head) if not h]
        grads = iter(torch.autograd.grad(self.head_input, body, start,
                                         retain_graph=True, is_grads_batched=True, allow_unused=True))
        heads = iter(single[1:])
        return [next(heads) if h else (None if (g := next(grads)) is None else g.flatten(0, 1))
                for h in self.in_head]


def _reaches(root: Tensor, stop: Tensor, targets: set) -> bool:
    """Whether root's autograd graph reaches a node of `targets` by a path that avoids stop's node."""
    stack, seen = [root.grad_fn], {stop.grad_fn}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in targets:
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


def _head_shortcut(model: nn.Module, recorder: CallRecorder, scored: ScoredRows, head_inputs: list[Tensor]
                   ) -> tuple[Tensor | None, list[bool]]:
    """(the LM head's input, which calls are the head's) when the head (`get_output_embeddings()`) was
    called once, on an input that needs a gradient, and every path from the log-probs to a call outside
    the head passes through that input; else (None, all False): the batched backward then starts at the
    log-probs."""
    head = model.get_output_embeddings()
    modules = set() if head is None else set(head.modules())
    in_head = [r.call.module in modules for r in recorder.calls]
    if len(head_inputs) != 1 or not head_inputs[0].requires_grad:
        return None, [False] * len(in_head)
    body = {r.output.grad_fn for r, h in zip(recorder.calls, in_head) if not h}
    if _reaches(scored.logp.sum(), head_inputs[0], body):
        return None, [False] * len(in_head)
    return head_inputs[0], in_head


def _row_graph(model: nn.Module, scope: ParameterScope, plan: Plan, row: Row, pad_id: int) -> _RowGraph:
    head = model.get_output_embeddings()
    inputs: list[Tensor] = []
    capture = (contextlib.nullcontext() if head is None else _inputs_of(head, inputs))
    with CallRecorder(model, scope, plan) as recorder, capture:
        scored = score_rows(model, [row], pad_id=pad_id)
    recorder.check_attribution(scored.logp.sum())
    head_input, in_head = _head_shortcut(model, recorder, scored, inputs)
    return _RowGraph(recorder, scored, recorder.outputs(recorder.calls), head_input, in_head)


@contextlib.contextmanager
def _inputs_of(module: nn.Module, inputs: list[Tensor]) -> Iterator[None]:
    """Collect the first tensor argument of every call of `module` made with grad enabled."""
    def pre(mod, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], Tensor):
            inputs.append(args[0])

    handle = module.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        handle.remove()


def _truncations(prompt_len: int, t: int, count: int | None = None) -> list[range]:
    """The response's t tokens split into `count` (at most t) consecutive blocks of sizes differing by
    at most one, each scored by a forward truncated after its last token (token t's log-prob does not
    depend on later positions). count None: the count up to `MAX_TRUNCATED_GRAPHS` with the least
    Σ_j (prompt_len + e_j)·(FORWARD_COST + K_j) for blocks of K_j tokens ending at token e_j, the
    positions forwarded (and backpropagated once through the head) and backpropagated K_j times."""
    def split(n: int) -> list[range]:
        return [range(t * i // n, t * (i + 1) // n) for i in range(n)]

    if count is not None:
        return split(max(1, min(count, t)))
    costs = {n: sum((prompt_len + b.stop) * (FORWARD_COST + len(b)) for b in split(n))
             for n in range(1, min(t, MAX_TRUNCATED_GRAPHS) + 1)}
    return split(min(costs, key=costs.get))


class _Response:
    """One response's truncated graphs (`_truncations`), built on first use and kept, and the per-token
    cotangents of a block of its tokens against the graph that scores the block's last token."""

    def __init__(self, model: nn.Module, scope: ParameterScope, plan: Plan, row: Row, pad_id: int,
                 truncate: int | None) -> None:
        self.model, self.scope, self.plan, self.row, self.pad_id = model, scope, plan, row, pad_id
        self.blocks = _truncations(len(row[0]), len(row[1]), truncate)
        self._graphs: dict[int, _RowGraph] = {}

    def graph(self, j: int) -> _RowGraph:
        if j not in self._graphs:
            prompt, response = self.row
            self._graphs[j] = _row_graph(self.model, self.scope, self.plan,
                                         (prompt, response[:self.blocks[j].stop]), self.pad_id)
        return self._graphs[j]

    def uses(self, tokens: range) -> list[tuple[Call, Call, Tensor]]:
        """(recorded call, call to factor, its cotangent [K, ...]) of every call with a cotangent, for the
        K tokens of `tokens`: calls outside the LM head factor the inputs of the graph of the last token
        against the cotangents of every graph concerned, zero-padded to that graph's length (a truncated
        graph's positions are a prefix of it, its values the same by causality); head calls become one
        virtual row per token at its position (`_at_positions`)."""
        parts = [(j, range(max(b.start, tokens.start), min(b.stop, tokens.stop)))
                 for j, b in enumerate(self.blocks) if b.start < tokens.stop and tokens.start < b.stop]
        ref = self.graph(parts[-1][0])
        if any(len(self.graph(j).recorder.calls) != len(ref.recorder.calls) for j, _ in parts):
            raise MarginscopeError("the exact tier's truncated forwards made different numbers of hooked calls")
        grads = [self.graph(j).cotangents(part) for j, part in parts]
        out = []
        for i, record in enumerate(ref.recorder.calls):
            if ref.in_head[i]:
                if grads[-1][i] is not None:
                    out.append(self._head_use(ref, i, tokens))
                continue
            pieces = [self._aligned(self.graph(j), i, g[i], ref) for (j, _), g in zip(parts, grads)]
            if all(p is None for p in pieces):
                continue
            like = next(p for p in pieces if p is not None)
            pieces = [like.new_zeros(len(part), *like.shape[1:]) if p is None else p
                      for p, (_, part) in zip(pieces, parts)]
            out.append((record.call, record.call, torch.cat(pieces)))
        return out

    @staticmethod
    def _head_use(ref: _RowGraph, i: int, tokens: range) -> tuple[Call, Call, Tensor]:
        call, grad = ref.recorder.calls[i].call, ref.single()[1 + sum(ref.in_head[:i])]
        q = ref.positions(tokens)
        zeros = torch.zeros_like(q)
        vcall, vgrad = _at_positions(call, grad, zeros, q, q, grad.shape[1])
        return call, vcall, vgrad

    @staticmethod
    def _aligned(graph: _RowGraph, i: int, grad: Tensor | None, ref: _RowGraph) -> Tensor | None:
        """Cotangents [K, ...] of call i of `graph` padded with zeros to the shape of ref's call i."""
        mine, theirs = graph.recorder.calls[i], ref.recorder.calls[i]
        if mine.call.module is not theirs.call.module:
            raise MarginscopeError("the exact tier's truncated forwards called the hooked modules in different "
                                   f"orders ({type(mine.call.module).__name__}, {type(theirs.call.module).__name__})")
        shape = theirs.output.shape
        if grad is None:
            return None
        differ = [d for d in range(1, grad.dim()) if grad.shape[d] != shape[d]]
        if len(differ) > 1 or (differ and grad.shape[differ[0]] > shape[differ[0]]):
            raise MarginscopeError(f"{type(mine.call.module).__name__}: the output of a truncated forward "
                                   f"{list(grad.shape[1:])} is no prefix of the full one's {list(shape[1:])}")
        if not differ:
            return grad
        pad = [0, 0] * (grad.dim() - 1 - differ[0]) + [0, shape[differ[0]] - grad.shape[differ[0]]]
        return torch.nn.functional.pad(grad, pad)


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
                       materialize: bool | None = None, truncate: int | None = None) -> TokenGram:
    """Tier "exact" of the per-token Gram between rows[0] and rows[1] (module doc): per row `truncate`
    forwards (default: as many as `_truncations` finds cheapest; batch 1, so `padding_side` plays no
    part), each truncated after the last token of its block of tokens; then per (chosen block, rejected block) of at most
    `max_tokens_per_chunk` tokens (default: as many as `TOKEN_CHUNK_BYTES` allows) one batched backward
    per truncated graph concerned and the block's contraction (`ghost.virtual`; materialize forces its
    materialized or ghost form, for tests). Returns float64 CPU (G [T_w, T_l], ‖g_w,t‖² [T_w],
    ‖g_l,s‖² [T_l]); raises MarginscopeError where a scope parameter is not attributable."""
    if truncate is not None and truncate < 1:
        raise MarginscopeError(f"truncate must be ≥ 1; got {truncate}")
    plan = attributable_plan(model, scope)
    responses = [_Response(model, scope, plan, row, pad_id, truncate) for row in rows]
    t_w, t_l = len(rows[0][1]), len(rows[1][1])
    full = [r.graph(len(r.blocks) - 1) for r in responses]
    per_token = max(sum(o.numel() * o.element_size() for o, h in zip(g.outputs, g.in_head) if not h) for g in full)
    width = max(len(prompt) + len(response) for prompt, response in rows)
    k = max_tokens_per_chunk or _tokens_per_chunk(per_token, width, TOKEN_CHUNK_BYTES)
    gram = torch.zeros(t_w, t_l, dtype=torch.float64)
    sq_w, sq_l = torch.zeros(t_w, dtype=torch.float64), torch.zeros(t_l, dtype=torch.float64)
    blocks_w, blocks_l = _blocks(t_w, t_l, k)
    only_l = responses[1].uses(blocks_l[0]) if len(blocks_l) == 1 else None
    for i, bw in enumerate(blocks_w):
        uses_w = responses[0].uses(bw)
        for j, bl in enumerate(blocks_l):
            uses_l = only_l if only_l is not None else responses[1].uses(bl)
            g, s_w, s_l = _block_gram((uses_w, uses_l), (bw, bl), (j == 0, i == 0), scope, materialize)
            gram[bw.start:bw.stop, bl.start:bl.stop] = g
            if j == 0:
                sq_w[bw.start:bw.stop] = s_w
            if i == 0:
                sq_l[bl.start:bl.stop] = s_l
    return gram, sq_w, sq_l


def _block_gram(uses: tuple[list, list], blocks: tuple[range, range], norms: tuple[bool, bool],
                scope: ParameterScope, materialize: bool | None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One block of chosen × rejected tokens: (G [K_w, K_l], ‖g_w‖² [K_w] or None, ‖g_l‖² [K_l] or None),
    float64 CPU, over every use of every scope parameter on both sides (a tied parameter's cross terms
    included), from each side's (recorded call, call to factor, cotangents) for its block's tokens."""
    sums = BlockSums(len(blocks[0]), len(blocks[1]), scope.params[0].device, norms=norms, materialize=materialize)
    for side, side_uses in enumerate(uses):
        for call, _, _ in side_uses:
            sums.expect(side, call)
    for n in range(max(map(len, uses))):  # both rows' calls in forward order: a factor is dropped early
        for side, side_uses in enumerate(uses):
            if n < len(side_uses):
                call, vcall, grad = side_uses[n]
                factors = call.kind.factors(vcall, grad)
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
