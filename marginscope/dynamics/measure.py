"""`measure()`: log-probs and gradient geometry of a probe set on one model state → `Geometry`."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import MarginscopeError
from ..progress import progress_bar
from .coefficients import classify, coefficients, gram_cosine, log_prob_ntk, predict_delta
from .exact import (
    ParamSpec,
    exact_gram_chunk,
    exact_token_gram,
    gradient_scope,
    probe_chunks,
    select_parameters,
)
from . import tokens
from .ghost import ghost_gram_chunk, ghost_supports
from .projection import projected_gram_chunk
from .scoring import EncodedProbe, model_max_length

ENGINES = ("auto", "exact", "ghost", "projected")
PER_TOKEN_TIERS = (None, "head", "tail", "exact")


@dataclass
class Geometry:
    """Everything `measure` computed for N probes × R responses (float64 numpy arrays).

    Response r of probe n is `names[r]` of probe `probe_ids[n]`; `token_logp[n, r, :lengths[n, r]]`
    holds its per-token log-probs (NaN beyond). `gram[n]` is the R×R empirical NTK of sequence
    log-probs over the parameter scope; `token_gram[probe_id]` the T_w × T_l per-token Gram of chosen
    against rejected when `per_token` was requested, with `token_sqnorm[probe_id]` =
    (‖g_w,t‖², ‖g_l,s‖²): raw values (`token_cosine` derives cosines) over the tier in `per_token`.
    """

    probe_ids: list[str]
    names: list[str]
    logp: np.ndarray
    lengths: np.ndarray
    token_logp: np.ndarray
    gram: np.ndarray
    encoded: list[EncodedProbe]
    scope_names: list[str]
    scope_spec: str
    n_params: int
    engine: str
    per_token: str | None = None
    token_gram: dict[str, np.ndarray] = field(default_factory=dict)
    token_sqnorm: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def logp_mean(self) -> np.ndarray:
        """Length-normalized log-probs log π(y|x) / |y|, [N, R]."""
        return self.logp / self.lengths

    @property
    def norms(self) -> np.ndarray:
        """‖∇ log π(y_r|x)‖, [N, R]."""
        return np.sqrt(np.einsum("nrr->nr", self.gram))

    @property
    def cosine(self) -> np.ndarray:
        """K[i,j] / sqrt(K[i,i] K[j,j]), [N, R, R]."""
        return gram_cosine(self.gram)

    def log_prob_ntk(self) -> tuple[np.ndarray, np.ndarray]:
        """Probability NTK π_i π_j K[i,j] as (log |value|, sign), [N, R, R] each."""
        return log_prob_ntk(self.gram, self.logp)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise MarginscopeError(f"no response named {name!r}; have {self.names}") from None

    def input_ids(self, n: int, r: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_ids, response_ids): the exact ids scored for probe n, response r."""
        r = self.index(r) if isinstance(r, str) else r
        enc = self.encoded[n]
        return np.asarray(enc.prompt_ids, dtype=np.int64), np.asarray(enc.response_ids[r], dtype=np.int64)

    def token_cosine(self, probe_id: str) -> np.ndarray:
        """Per-token cosine G[t,s] / (‖g_w,t‖ ‖g_l,s‖) for one probe (margin-pitfalls Fig. 4b)."""
        sq_w, sq_l = self.token_sqnorm[probe_id]
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.token_gram[probe_id] / np.sqrt(np.outer(sq_w, sq_l))


def check_options(*, engine: str, per_token: str | None, batch_size: int, padding_side: str) -> None:
    """Reject bad `measure` options before any model is loaded or run."""
    if engine not in ENGINES:
        raise MarginscopeError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if per_token not in PER_TOKEN_TIERS:
        raise MarginscopeError(f"per_token must be one of None, 'head', 'tail', 'exact'; got {per_token!r}")
    if batch_size < 1:
        raise MarginscopeError(f"batch_size must be ≥ 1; got {batch_size}")
    if padding_side not in ("left", "right"):
        raise MarginscopeError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")


def measure(model: nn.Module, tokenizer: PreTrainedTokenizerBase, probes, *,
            params: ParamSpec = "trainable", engine: str = "auto", per_token: str | None = None,
            batch_size: int = 8, padding_side: str = "right", convention: str = "trl",
            max_length: int | None = None, truncation_mode: str = "keep_start", add_eos: bool = False,
            encoded: list[EncodedProbe] | None = None, projection_dim: int = 4096, projection_seed: int = 0, progress: bool = False) -> Geometry:
    """Score every response of every probe and compute the Gram of their log-prob gradients.

    convention: how probes become token ids (`marginscope.conventions`): "trl" (default; TRL 1.x's
    DPOTrainer, by its own data preparation: joint tokenization, chat template with end-of-turn for
    probes with `prompt_messages`, EOS after plain text; needs trl) or "separate" (prompt and response
    tokenized apart; `add_eos` appends EOS). max_length / truncation_mode: the trainer's truncation of
    prompt+response, as in `DPOConfig` (None: none). encoded: the ids to score, one `EncodedProbe` per
    probe in order (e.g. from `marginscope.conventions.encode_probes`); given, the convention options are
    not used.

    engine: "exact" (one backward per response), "ghost" (one forward and one backward per chunk,
    per-layer inner products without per-response gradients; same numbers) or "auto" ("ghost" when
    it attributes every parameter of the scope, else "exact"); all accumulate in float64.
    "projected" (never chosen by "auto"): an unbiased estimate for very large models from seeded
    Kronecker-structured random projections of each layer's per-row gradient, at most
    `projection_dim` numbers per parameter (projection.py; relative error ~ dim^-0.4, exact when
    `projection_dim` reaches every parameter's size).
    per_token: the T_w × T_l Gram of chosen against rejected per-token gradients
    g_t = ∇ log π(y_t | x, y_<t), over the uses of scope parameters in a tier (tokens.py):
      None     not computed;
      "head"   the LM head module's calls only (`get_output_embeddings()`; for a tied model its head
               use, not the embedding use): one forward and a backward down to the logits;
      "tail"   the calls that start after the last attention module returns (the last block's
               post-attention norm and MLP, the final norm, the head): one forward and one backward;
      "exact"  every use of every scope parameter: batched per-token cotangents (is_grads_batched)
               contracted like the ghost engine when the engine is "ghost" (or "auto" resolving to
               it); one backward per token (the oracle) when the engine is "exact".
    Head and tail cover the scope parameters the ghost engine attributes in their modules, and raise
    MarginscopeError when none is. The model's parameters, `.grad`, train/eval mode and the RNG state
    are left exactly as they were.
    """
    check_options(engine=engine, per_token=per_token, batch_size=batch_size, padding_side=padding_side)
    if isinstance(probes, str) or hasattr(probes, "__fspath__"):
        from ..probes import load
        probes = load(probes)
    scope = select_parameters(model, params)
    if engine == "auto":
        engine = "ghost" if ghost_supports(model, scope) else "exact"
    if engine == "projected":
        gram_chunk = partial(_projected_gram_chunk, dim=projection_dim, seed=projection_seed)
    else:
        gram_chunk = ghost_gram_chunk if engine == "ghost" else exact_gram_chunk
    if encoded is None:
        from ..conventions import encode_probes

        encoded = encode_probes(tokenizer, probes, convention=convention, max_length=max_length,
                                truncation_mode=truncation_mode, add_eos=add_eos,
                                context_length=model_max_length(model))
    elif [e.probe_id for e in encoded] != list(probes.ids):
        raise MarginscopeError("encoded: one EncodedProbe per probe, in the probe set's order")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = list(probes.response_names)
    n, r = len(encoded), len(names)
    lengths = np.array([[len(ids) for ids in e.response_ids] for e in encoded], dtype=np.int64)
    token_logp = np.full((n, r, int(lengths.max())), np.nan)
    gram = np.zeros((n, r, r))
    token_gram, token_sqnorm = {}, {}
    chunks = list(probe_chunks(encoded, batch_size))
    steps = len(chunks) + (n if per_token else 0)
    with gradient_scope(model, scope), progress_bar(progress, "measuring", steps) as advance:
        start = 0
        for chunk in chunks:
            scored, grams = gram_chunk(model, chunk, scope, padding_side=padding_side, pad_id=pad_id)
            tl = scored.token_logp.to(torch.float64).cpu().numpy().reshape(len(chunk), r, -1)
            for k, probe in enumerate(chunk):
                for j in range(r):
                    token_logp[start + k, j, :lengths[start + k, j]] = tl[k, j, :lengths[start + k, j]]
                gram[start + k] = grams[k].numpy()
            start += len(chunk)
            advance()
        if per_token:
            oracle = per_token == "exact" and engine == "exact"  # "projected" uses the exact fast tier
            tier_gram = exact_token_gram if oracle else partial(tokens.token_gram, tier=per_token)
            for probe in encoded:
                g, sq_w, sq_l = tier_gram(model, probe, scope, padding_side=padding_side, pad_id=pad_id)
                token_gram[probe.probe_id] = g.numpy()
                token_sqnorm[probe.probe_id] = (sq_w.numpy(), sq_l.numpy())
                advance()
    return Geometry(
        probe_ids=[e.probe_id for e in encoded], names=names, logp=np.nansum(token_logp, axis=-1),
        lengths=lengths, token_logp=token_logp, gram=gram, encoded=encoded,
        scope_names=list(scope.names), scope_spec=scope.spec, n_params=scope.numel, engine=engine,
        per_token=per_token, token_gram=token_gram, token_sqnorm=token_sqnorm)


def _projected_gram_chunk(*args, dim: int, seed: int, **kwargs):
    scored, grams, _ = projected_gram_chunk(*args, dim=dim, seed=seed, **kwargs)
    return scored, grams


@dataclass
class PairDynamics:
    """The loss's view of each pair: coefficients, Case and first-order Δlog π per unit step size."""

    d_w: np.ndarray  # [N]
    d_l: np.ndarray  # [N]
    case: np.ndarray  # [N] int8
    predicted_delta: np.ndarray  # [N, R]


def pair_dynamics(geo: Geometry, loss, ref_logp: np.ndarray | None = None) -> PairDynamics:
    """d_w, d_l of `loss` at the measured log-probs, the Case, and Δlog π_i ≈ d_w K[i,w] − d_l K[i,l].

    ref_logp [N, R]: the reference model's log-probs; by default the measured model itself (the
    state at the start of a preference run, where every log-ratio is 0).
    """
    return pair_dynamics_of(geo.logp, geo.gram, geo.lengths, geo.names, loss,
                            geo.logp if ref_logp is None else ref_logp)


def pair_dynamics_of(logp: np.ndarray, gram: np.ndarray, lengths: np.ndarray, names: list[str], loss,
                     ref_logp: np.ndarray) -> PairDynamics:
    """`pair_dynamics` on arrays: logp, ref_logp, lengths [N, R], gram [N, R, R], response `names`."""
    if "chosen" not in names or "rejected" not in names:
        raise MarginscopeError(f"responses {names} lack 'chosen' or 'rejected'")
    w, l = names.index("chosen"), names.index("rejected")
    ref = np.asarray(ref_logp, dtype=np.float64)
    d_w, d_l = coefficients(loss, logp[:, w], logp[:, l], ref[:, w], ref[:, l],
                            lengths[:, w].astype(np.float64), lengths[:, l].astype(np.float64))
    return PairDynamics(d_w, d_l, classify(gram, d_w, d_l, w=w, l=l),
                        predict_delta(gram, d_w, d_l, eta=1.0, w=w, l=l))
