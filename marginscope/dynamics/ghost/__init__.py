"""Ghost engine: the exact Gram of per-response gradients from one forward and one backward.

Rows are independent, so one backward of Σ_r log π(y_r | x) gives every module call's output
cotangent D_r exactly as row r's own backward would. With the call's input X_r, each parameter's
per-row gradient is known in factored form, G_r = Σ_t l_r,t ⊗ m_r,t, and Grams are contracted
without ever materializing a parameter-sized tensor:

    ⟨G_a, G'_b⟩ = Σ_{t,s} (l_a,t · l'_b,s)(m_a,t · m'_b,s)

    nn.Linear weight [d_out, d_in]      l = D, m = X  → Σ (D_a D_bᵀ) ⊙ (X_a X_bᵀ)
    GPT-2 Conv1D weight [d_in, d_out]   l = X, m = D
    nn.Embedding weight (ids i)         l = one-hot(i), m = D → Σ [i_a,t = i_b,s] D_a,t · D_b,s
                                        (called on one row for the batch, e.g. GPT-2's positions without
                                        position_ids: D read where its output is broadcast-added)
    biases                              ∇b_r = Σ_t D_r,t, materialized
    any other small leaf module         ∇θ_r materialized by a vmap over rows of a vjp (norms)

A layer switches to materializing D_rᵀX_r when that takes fewer multiply-adds, R·T·(d_in + d_out) >
2·d_in·d_out for groups of R rows of T tokens (`contract._materializes`). A parameter used by several calls
(tied embeddings, a module called twice) has ∇θ_r = Σ_u ∇θ_r^u, so the cross terms of its uses are
added (`GramSums`). Everything is contracted per group of rows (one probe's responses): dot products over a layer's
feature dimension in the activations' dtype (float32 at least), every Gram sum in float64.
Module kinds are recognized by their `forward` function, never by isinstance alone.

A softmax LM head used outside its module (a fused log-prob kernel such as TRL 1.x's `fused_lm_head`)
is attributed as a "functional head" (`FunctionalHead`, `GhostCollector.watch_head`): its per-row gradient
is the outer factor of the hidden states H fed to it and D = g·z'(y)⊙(e_target − softmax(z)), with g the
gradient reaching each scored token's log-prob; D is never held as a [B, T, V] tensor (`SoftmaxHead`
recomputes the logits in vocabulary chunks wherever a Gram needs them).

`GhostCollector` contracts each call's factors in a tensor hook on its output during the backward.
`CallRecorder`, its base, is the capture mode: the same forward hooks record each call and its output
and touch no tensor, so that `autograd.grad` can differentiate straight to the outputs (batched over
per-token cotangents in tokens.py, where tensor hooks would not fire); the handlers, `pair_gram` and
`GramSums` then contract any rows built from those inputs and cotangents ("virtual rows").

Limits: a generic module must treat rows independently (every norm does) and replay from its
captured inputs; a scope parameter used outside the hooked calls (a functional use, a bypassed
module, reentrant checkpointing) is detected by `GhostCollector.check_attribution`, not attributed;
hooked calls' inputs are held until their cotangent arrives, so under checkpointing the collector
keeps what checkpointing would have dropped; forward calls made while a backward runs (checkpointing
recomputation) are never recorded; one forward/backward pass over one batch of rows per collector.

Layout (one concern per file):

    factors.py      the factored per-row gradients: Outer, Dense, SoftmaxHead (+ LogitTransform)
    contract.py     pair_gram: the [G, R, R] Gram between two factors (ghost or materialized)
    kinds.py        Call (one hooked forward call) and Kind (how a module kind factors its gradients)
    layers/         one handler per layer type: linear.py (Linear, Conv1D), embedding.py, rowwise.py
    plan.py         which modules to hook, with which kind; ghost_supports
    sums.py         GramSums: the sums over every use of a parameter (tied weights' cross terms)
    capture.py      CallRecorder: forward hooks recording each call; autograd sequence marks
    collector.py    GhostCollector: the Gram contracted during the backward; FunctionalHead
    chunk.py        ghost_gram_chunk: the probe Gram of a chunk of probes
    virtual.py      BlockSums: virtual rows sharing one row's inputs (the exact per-token tier)
"""

from .capture import CallRecorder, Recorded, in_backward, sequence_mark
from .chunk import ghost_gram_chunk
from .collector import SOFTMAX_HEAD, FunctionalHead, GhostCollector
from .contract import pair_gram
from .factors import Dense, Factor, LogitTransform, Outer, SoftmaxHead, softmax_head_factors
from .kinds import Call, Kind
from .layers import CONV1D, EMBEDDING, KINDS, LINEAR, ROWWISE, ROWWISE_MAX_NUMEL
from .plan import Plan, attributable_plan, ghost_supports, plan_modules
from .sums import GramSums
from .virtual import BlockSums, virtual_pair

__all__ = [
    "CONV1D", "BlockSums", "Call", "CallRecorder", "Dense", "EMBEDDING", "Factor", "FunctionalHead", "GhostCollector",
    "GramSums", "KINDS", "Kind", "LINEAR", "LogitTransform", "Outer", "Plan", "ROWWISE", "ROWWISE_MAX_NUMEL",
    "Recorded", "SOFTMAX_HEAD", "SoftmaxHead", "attributable_plan", "ghost_gram_chunk", "ghost_supports",
    "in_backward", "pair_gram", "plan_modules", "sequence_mark", "softmax_head_factors",
    "virtual_pair",
]
