"""Response sets → token ids → per-token and sequence log-probs.

`encode` is the "separate" convention: the prompt is tokenized with the tokenizer's special tokens
(e.g. BOS), each response on its own without special tokens (optionally followed by EOS), and the two
id lists are concatenated (TRL 0.x). TRL 1.x's joint tokenization ("trl", the default elsewhere)
calls TRL itself and lives outside this package, in `marginscope.conventions`; both give
`EncodedProbe`s with one prompt shared by the probe's responses. The prompt always takes part in the
forward pass but is never scored: for a response y of T tokens,

    log π(y | x) = Σ_t log softmax(f(x, y_<t))[y_t].

Rows are padded on the left or right with explicit position ids, so both give the same numbers.
Log-softmax runs in float32 at least (float64 models stay float64).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MarginscopeError

Row = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class EncodedProbe:
    """The exact ids scored for one probe: the prompt and one id list per response name."""

    probe_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]

    def rows(self) -> list[Row]:
        return [(self.prompt_ids, r) for r in self.response_ids]


def model_max_length(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position scheme accepts, when the config says so."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(tokenizer: PreTrainedTokenizerBase, probes, *, add_eos: bool = False,
           max_length: int | None = None) -> list[EncodedProbe]:
    """Tokenize every probe's prompt and responses (`probes.response_names` order)."""
    names = probes.response_names
    encoded = []
    for probe in probes:
        prompt_ids = tuple(tokenizer(probe.prompt, add_special_tokens=True)["input_ids"])
        if not prompt_ids:
            raise MarginscopeError(
                f"probe {probe.id!r}: the prompt tokenizes to no ids and the tokenizer adds no BOS, "
                "so the first response token has no context")
        responses = []
        texts = probe.responses
        for name in names:
            ids = list(tokenizer(texts[name], add_special_tokens=False)["input_ids"])
            if add_eos:
                if tokenizer.eos_token_id is None:
                    raise MarginscopeError("add_eos=True but the tokenizer has no eos_token")
                ids.append(tokenizer.eos_token_id)
            if not ids:
                raise MarginscopeError(f"probe {probe.id!r}: response {name!r} tokenizes to no ids")
            total = len(prompt_ids) + len(ids)
            if max_length is not None and total > max_length:
                raise MarginscopeError(
                    f"probe {probe.id!r}: prompt + {name} is {total} tokens, longer than the model's "
                    f"context of {max_length}")
            responses.append(tuple(ids))
        encoded.append(EncodedProbe(probe.id, prompt_ids, tuple(responses)))
    return encoded


def vocabulary_text(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The decoded text of every token id 0 .. len(tokenizer)−1 on its own (special tokens included,
    spaces kept; a NUL character written as the four characters `\\x00`), what a trace stores so
    figures show words without the tokenizer."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [t.replace("\x00", "\\x00") for t in texts]


@dataclass
class ScoredRows:
    """Per-token log-probs of a batch of rows; `mask` marks real response tokens."""

    token_logp: torch.Tensor  # [B, T] (0 where mask is False)
    mask: torch.Tensor  # [B, T] bool
    logit_pos: torch.Tensor  # [B, T] position in the padded row of the logits that score each token

    @property
    def logp(self) -> torch.Tensor:
        """[B] sequence log-probs, summed in float64 (differentiable): every path (measure, the
        reference, a training step) sums the same float32-or-wider token log-probs the same way, so a
        reference equal to the policy gives a reward of exactly 0."""
        return self.token_logp.to(torch.float64).sum(-1)

    def detach(self) -> ScoredRows:
        return ScoredRows(self.token_logp.detach(), self.mask, self.logit_pos)

    def scored_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, token, logit position) of every scored token, row by row: [K] each."""
        row, token = self.mask.nonzero(as_tuple=True)
        return row, token, self.logit_pos[row, token]


def _pad_batch(rows: Sequence[Row], padding_side: str, pad_id: int, device: torch.device):
    lengths = [len(p) + len(r) for p, r in rows]
    width = max(lengths)
    t_max = max(len(r) for _, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    # (row, position of the logit that predicts response token t, target id) for each scored token
    logit_pos = torch.zeros((len(rows), t_max), dtype=torch.long)
    targets = torch.zeros((len(rows), t_max), dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.bool)
    for b, (prompt, response) in enumerate(rows):
        offset = width - lengths[b] if padding_side == "left" else 0
        ids = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        input_ids[b, offset:offset + lengths[b]] = ids
        attention[b, offset:offset + lengths[b]] = 1
        t = len(response)
        logit_pos[b, :t] = offset + len(prompt) - 1 + torch.arange(t)
        targets[b, :t] = torch.tensor(list(response), dtype=torch.long)
        mask[b, :t] = True
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return (input_ids.to(device), attention.to(device), position_ids.to(device),
            logit_pos.to(device), targets.to(device), mask.to(device))


def score_rows(model: PreTrainedModel, rows: Sequence[Row], *, padding_side: str = "right",
               pad_id: int = 0) -> ScoredRows:
    """Differentiable per-token log-probs of each row's response given its prompt (one forward)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    device = next(model.parameters()).device
    input_ids, attention, position_ids, logit_pos, targets, mask = _pad_batch(
        rows, padding_side, pad_id, device)
    log_probs = _scored_log_softmax(model, input_ids, attention, position_ids, logit_pos)
    token_logp = torch.gather(log_probs, 2, targets.unsqueeze(-1)).squeeze(-1)
    return ScoredRows(token_logp.masked_fill(~mask, 0.0), mask, logit_pos)


def _keeps_scored_logits(model: PreTrainedModel) -> bool:
    """Whether the model's forward takes transformers' `logits_to_keep` as a [B, T] index of positions
    (its module uses `slice_logits_to_keep`), so the LM head runs at the scored positions only. A
    wrapper that calls a model with other parameter values names it as `wrapped_model`."""
    forward = type(getattr(model, "wrapped_model", model)).forward
    return ("logits_to_keep" in inspect.signature(forward).parameters
            and hasattr(sys.modules.get(forward.__module__), "slice_logits_to_keep"))


def _scored_log_softmax(model: PreTrainedModel, input_ids, attention, position_ids, logit_pos) -> torch.Tensor:
    """[B, T, V] next-token log-softmax at each scored position (float32 at least). The LM head runs
    at the scored positions only where the model allows it (`_keeps_scored_logits`): no logits over the
    prompt or padding, and the head's hooked call sees [B, T, d] inputs, position t scoring token t."""
    if _keeps_scored_logits(model):
        picked = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                       use_cache=False, logits_to_keep=logit_pos).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                       use_cache=False).logits
        picked = torch.gather(logits, 1, logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return picked.to(torch.promote_types(picked.dtype, torch.float32)).log_softmax(-1)


def sequence_logp(model: PreTrainedModel, encoded: Sequence[EncodedProbe], *, batch_size: int = 8,
                  padding_side: str = "right", pad_id: int = 0) -> torch.Tensor:
    """float64 [N, R] sequence log-probs without gradients (e.g. of a reference model), eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                rows = [row for probe in chunk for row in probe.rows()]
                logp = score_rows(model, rows, padding_side=padding_side, pad_id=pad_id).logp
                out.append(logp.cpu().reshape(len(chunk), -1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def top_tokens(model: PreTrainedModel, encoded: Sequence[EncodedProbe], k: int, *, batch_size: int = 8,
               padding_side: str = "right", pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Where the probability mass goes: the k most probable next tokens under teacher forcing at
    every scored position of every response, most probable first (top-1 = the argmax y*_t).

    Returns (ids int32 [N, R, T, k], −1 beyond a response; probabilities float32 [N, R, T, k], NaN
    beyond), T the longest response. No gradients, eval mode, the model's mode restored.
    """
    if k < 1:
        raise MarginscopeError(f"top_k must be ≥ 1; got {k}")
    n, r = len(encoded), len(encoded[0].response_ids) if encoded else 0
    t_max = max((len(ids) for e in encoded for ids in e.response_ids), default=0)
    ids_out = np.full((n, r, t_max, k), -1, dtype=np.int32)
    prob_out = np.full((n, r, t_max, k), np.nan, dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                chunk = encoded[start:start + batch_size]
                rows = [row for probe in chunk for row in probe.rows()]
                input_ids, attention, position_ids, logit_pos, _, mask = _pad_batch(
                    rows, padding_side, pad_id, device)
                log_probs = _scored_log_softmax(model, input_ids, attention, position_ids, logit_pos)
                top = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
                top_ids, top_prob = top.indices.cpu().numpy(), top.values.exp().float().cpu().numpy()
                mask = mask.cpu().numpy()
                for b in range(len(rows)):
                    i, j = start + b // r, b % r
                    t = int(mask[b].sum())
                    ids_out[i, j, :t, :top_ids.shape[-1]] = top_ids[b, :t]
                    prob_out[i, j, :t, :top_ids.shape[-1]] = top_prob[b, :t]
    finally:
        model.train(was_training)
    return ids_out, prob_out
