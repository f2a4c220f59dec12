"""Scoring conventions: how a probe becomes the token ids that are scored.

A probe's log-probs are comparable with a training run's own numbers only when its ids are the ones
the trainer builds for the same pair (DESIGN §6). Two conventions:

- ``"trl"`` (the default): TRL 1.x's `DPOTrainer`, produced by calling TRL's own data preparation
  (`DPOTrainer._prepare_dataset`, then `DataCollatorForPreference` for `max_length` truncation), not
  a re-implementation. Prompt and prompt+response are tokenized *jointly*; the response is what
  follows their common prefix (a token merged across the boundary moves into the response, the same
  prompt for chosen and rejected); a conversational probe (one with ``prompt_messages``) is rendered
  through the chat template as a whole conversation, so its response carries the template's
  end-of-turn tokens (e.g. ``<|im_end|>`` and a newline); a plain-text response gets EOS appended.
  Needs `trl` (``pip install 'marginscope[trl]'``).
- ``"separate"``: the prompt string tokenized with special tokens (e.g. BOS), each response on its
  own without them (optionally followed by EOS, `add_eos`), concatenated: TRL 0.x and marginscope
  before this option; what `marginscope train` and the demo use unless told otherwise.

Truncation (``max_length``, ``truncation_mode`` "keep_start" | "keep_end", as in `DPOConfig`) applies
to prompt+response like TRL's collator. A response left with no token is an error naming the probe
(TRL drops such pairs from training), never a NaN record; so is "keep_end" cutting into the prompt,
since the prompt would then differ between chosen and rejected.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace
from typing import Any

from transformers import PreTrainedTokenizerBase

from .dynamics.scoring import EncodedProbe, encode
from .errors import MarginscopeError

CONVENTIONS = ("trl", "separate")
TRUNCATION_MODES = ("keep_start", "keep_end")


def check_convention(convention: str, *, max_length: int | None = None, truncation_mode: str = "keep_start",
                     add_eos: bool = False) -> None:
    """Reject bad convention options (MarginscopeError) before any model is loaded or run."""
    if convention not in CONVENTIONS:
        raise MarginscopeError(f"convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise MarginscopeError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}; got "
                               f"{truncation_mode!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise MarginscopeError(f"max_length must be a positive integer or None; got {max_length!r}")
    if add_eos and convention != "separate":
        raise MarginscopeError("add_eos belongs to the 'separate' convention; the 'trl' convention appends EOS "
                               "to plain-text responses itself (and keeps a chat template's end-of-turn)")


def encode_probes(tokenizer: PreTrainedTokenizerBase, probes, *, convention: str = "trl",
                  max_length: int | None = None, truncation_mode: str = "keep_start", add_eos: bool = False,
                  context_length: int | None = None, trainer: Any = None) -> list[EncodedProbe]:
    """The ids scored for every probe (`probes.response_names` order) under `convention`.

    max_length / truncation_mode: the trainer's truncation of prompt+response (None: none).
    context_length: the model's context; a row longer than it is an error. trainer: a `trl.DPOTrainer`
    whose own `_prepare_dataset` is called (default: TRL's, with this tokenizer). Extra responses are
    prepared like a chosen response; one whose joint tokenization does not extend the pair's prompt is
    an error. Raises MarginscopeError naming the probe for an unusable probe.
    """
    check_convention(convention, max_length=max_length, truncation_mode=truncation_mode, add_eos=add_eos)
    if convention == "separate":
        encoded, collate = encode(tokenizer, probes, add_eos=add_eos), _plain_collator(max_length, truncation_mode)
    else:
        encoded, collate = _trl_rows(tokenizer, probes, trainer), _trl_collator(tokenizer, max_length, truncation_mode)
    if max_length is not None:
        encoded = [_truncated(e, probes.response_names, max_length, truncation_mode, collate) for e in encoded]
    for probe in encoded:
        total = max(len(probe.prompt_ids) + len(r) for r in probe.response_ids)
        if context_length is not None and total > context_length:
            raise MarginscopeError(f"probe {probe.probe_id!r}: prompt + response is {total} tokens, longer than "
                                   f"the model's context of {context_length}; shorten it or set max_length")
    return encoded


# --- TRL's own preparation ----------------------------------------------------------------------------

def _import_trl():
    try:
        from datasets import Dataset
        from trl import DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference
    except ImportError as err:
        raise MarginscopeError(
            f"convention 'trl' calls TRL's own data preparation and trl is not importable ({err}); install it "
            "(pip install 'marginscope[trl]') or pass convention='separate' (--convention separate)") from None
    return Dataset, DPOTrainer, DataCollatorForPreference


def trl_example(probe, response: str, other: str | None = None) -> dict[str, Any]:
    """The TRL dataset row of `probe` with `response` as chosen (and `other`, default the same, as
    rejected): conversational (prompt messages, one assistant message each) when the probe has
    ``prompt_messages``, plain text otherwise."""
    other = response if other is None else other
    if probe.prompt_messages:
        return {"prompt": [dict(m) for m in probe.prompt_messages],
                "chosen": [{"role": "assistant", "content": response}],
                "rejected": [{"role": "assistant", "content": other}]}
    return {"prompt": probe.prompt, "chosen": response, "rejected": other}


@contextlib.contextmanager
def _quiet_datasets():
    from datasets.utils import logging as ds_logging

    enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            ds_logging.enable_progress_bar()


def _trl_rows(tokenizer, probes, trainer) -> list[EncodedProbe]:
    """Untruncated ids from TRL's `_prepare_dataset`: one row per probe for chosen/rejected (their
    shared prompt, exactly TRL's) and one per extra response, reconciled onto that prompt."""
    Dataset, DPOTrainer, _ = _import_trl()
    names = probes.response_names
    examples, owner = [], []
    for n, probe in enumerate(probes):
        examples.append(trl_example(probe, probe.chosen, probe.rejected))
        owner.append((n, None))
        for name in names[2:]:
            examples.append(trl_example(probe, probe.extra[name]))
            owner.append((n, name))
    if any(p.prompt_messages for p in probes) and not all(p.prompt_messages for p in probes):
        raise MarginscopeError(f"{probes.source}: some probes have prompt_messages and some do not; a TRL "
                               "dataset is either conversational or plain text")
    if any(p.prompt_messages for p in probes) and not getattr(tokenizer, "chat_template", None):
        raise MarginscopeError(f"{probes.source}: conversational probes (prompt_messages) need a tokenizer "
                               "with a chat template")
    # the trainer's own method (a subclass override included), else TRL's on this tokenizer
    prepare = trainer._prepare_dataset if trainer is not None else functools.partial(
        DPOTrainer._prepare_dataset, SimpleNamespace(_tokenizer=tokenizer))
    # no max_length here: TRL's filter would silently drop a probe; truncation is applied afterwards
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    with _quiet_datasets():
        try:
            prepared = prepare(Dataset.from_list(examples), tokenizer, args, "marginscope probes")
        except Exception as err:  # noqa: BLE001 — a template/tokenizer failure, reported in one line
            raise MarginscopeError(f"{probes.source}: TRL's data preparation failed on the probes: "
                                   f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        prepared = prepared.to_list()
    if len(prepared) != len(examples):
        raise MarginscopeError(f"{probes.source}: TRL's data preparation returned {len(prepared)} rows for "
                               f"{len(examples)} responses")
    prompts: dict[int, list[int]] = {}
    responses: dict[int, list[tuple[int, ...]]] = {}
    for row, (n, name) in zip(prepared, owner):
        if name is None:  # chosen/rejected: TRL's shared prompt and its two completions, as is
            prompts[n] = list(row["prompt_ids"])
            responses[n] = [tuple(row["chosen_ids"]), tuple(row["rejected_ids"])]
            continue
        full, prompt = list(row["prompt_ids"]) + list(row["chosen_ids"]), prompts[n]
        if full[:len(prompt)] != prompt:
            raise MarginscopeError(
                f"probe {probes[n].id!r}: response {name!r} tokenized after the prompt does not start with the "
                "pair's prompt ids (a token merges across the boundary differently than for chosen/rejected); "
                "end the prompt on a token boundary")
        responses[n].append(tuple(full[len(prompt):]))
    out = [EncodedProbe(p.id, tuple(prompts[n]), tuple(responses[n])) for n, p in enumerate(probes)]
    for probe in out:
        if not probe.prompt_ids:
            raise MarginscopeError(f"probe {probe.probe_id!r}: the prompt tokenizes to no ids shared with the "
                                   "responses and the tokenizer adds no BOS, so the first response token has no "
                                   "context")
        for name, ids in zip(names, probe.response_ids):
            if not ids:
                raise MarginscopeError(f"probe {probe.probe_id!r}: response {name!r} tokenizes to no ids")
    return out


def _trl_collator(tokenizer, max_length: int | None, truncation_mode: str):
    _, _, DataCollatorForPreference = _import_trl()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = DataCollatorForPreference(pad_token_id=pad, max_length=max_length, truncation_mode=truncation_mode)

    def collate(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        batch = collator([{"prompt_ids": prompt, "chosen_ids": response, "rejected_ids": response}])
        keep = batch["attention_mask"][0].bool()
        ids, mask = batch["input_ids"][0][keep].tolist(), batch["completion_mask"][0][keep].tolist()
        start = mask.index(1) if 1 in mask else len(mask)
        return ids[:start], ids[start:]
    return collate


def _plain_collator(max_length: int | None, truncation_mode: str):
    """The collator's per-row truncation of prompt+response, for the 'separate' convention."""
    def collate(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        ids = prompt + response
        if truncation_mode == "keep_start":
            kept = ids[:max_length]
            return kept[:len(prompt)], kept[len(prompt):]
        cut = max(len(ids) - max_length, 0)
        kept, prompt_kept = ids[cut:], prompt[cut:]
        return prompt_kept, kept[len(prompt_kept):]
    return collate


def _truncated(probe: EncodedProbe, names, max_length: int, truncation_mode: str, collate) -> EncodedProbe:
    """`probe` cut to `max_length` as the trainer's collator cuts each prompt+response row."""
    prompts, responses = set(), []
    for name, ids in zip(names, probe.response_ids):
        prompt, response = collate(list(probe.prompt_ids), list(ids))
        if not response:
            raise MarginscopeError(
                f"probe {probe.probe_id!r}: max_length={max_length} ({truncation_mode}) leaves response {name!r} "
                f"with no token (the prompt is {len(probe.prompt_ids)} tokens; TRL drops such pairs from "
                "training); shorten the prompt or raise max_length")
        prompts.add(tuple(prompt))
        responses.append(tuple(response))
    if len(prompts) != 1 or not next(iter(prompts)):
        raise MarginscopeError(
            f"probe {probe.probe_id!r}: max_length={max_length} with truncation_mode='keep_end' cuts into the "
            "prompt differently for its responses; raise max_length or use keep_start")
    return EncodedProbe(probe.probe_id, next(iter(prompts)), tuple(responses))
