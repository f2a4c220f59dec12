"""Probe sets sampled from a local preference dataset: JSONL, CSV, Parquet or a `datasets` folder.

    probes = from_preferences("prefs.parquet", n=100, seed=0, tokenizer=tok, max_len=512)

Rows hold a prompt, a chosen and a rejected response, as strings or as chat messages
([{"role": ..., "content": ...}]). A chat row keeps its prompt messages (`Probe.prompt_messages`, so
the "trl" convention renders the whole conversation through the chat template, end-of-turn
included) and its prompt flattened with the tokenizer's chat template (the "separate" convention's
text, shown in figures). Every problem is an
InputError naming the file, the line (JSONL, CSV) or 1-based row (Parquet, datasets) and the field.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..conventions import check_convention, encode_probes
from ..errors import InputError, MarginscopeError
from .probeset import Probe, ProbeSet, _text_problem, _type_name

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
SUPPORTED = "JSONL (.jsonl), CSV (.csv), Parquet (.parquet) or a datasets.save_to_disk folder"
Record = tuple[int, Mapping[str, object]]  # (line or row number, the row's values by column)
Fail = Callable[[str, str], InputError]  # (reason, column) → the error located at the current row


@dataclass(frozen=True)
class _Pair:
    index: int  # 0-based row index in the dataset
    prompt: str
    chosen: str
    rejected: str
    messages: list[dict] | None = None


def from_preferences(path: str | os.PathLike[str], n: int, seed: int = 0, *, prompt_col: str = "prompt",
                     chosen_col: str = "chosen", rejected_col: str = "rejected",
                     tokenizer: PreTrainedTokenizerBase | None = None, min_len: int | None = None,
                     max_len: int | None = None, convention: str = "trl") -> ProbeSet:
    """`n` pairs sampled (seeded, kept in dataset order, ids pref-<row index>) from a preference
    dataset, after the length filters: min_len ≤ prompt + longer response ≤ max_len, counted in
    tokens with `tokenizer` as they will be scored under `convention` ("trl" or "separate", see
    `marginscope.conventions`), else in characters. Chat-format rows need a tokenizer with a chat
    template (see docs/probes.md)."""
    if n < 1:
        raise MarginscopeError(f"n must be at least 1; got {n}")
    _check_bounds(min_len, max_len)
    check_convention(convention)
    path = Path(path)
    columns = (prompt_col, chosen_col, rejected_col)
    pairs = [_pair(path, index, where, row, columns, tokenizer)
             for index, (where, row) in enumerate(_records(path, columns))]
    if not pairs:
        raise InputError("contains no rows", path)
    total, filtered = len(pairs), min_len is not None or max_len is not None
    if filtered:
        lengths = _lengths(pairs, tokenizer, convention, str(path))
        pairs = [p for p, length in zip(pairs, lengths) if _within(length, min_len, max_len)]
    if len(pairs) < n:
        unit = "tokens" if tokenizer is not None else "characters"
        found = (f"only {len(pairs)} of {total} pairs pass the length filters (min_len={min_len}, "
                 f"max_len={max_len}, in {unit})" if filtered else f"only {len(pairs)} pairs in the data")
        raise InputError(f"{found}; asked for n={n}", path)
    picked = [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), n))]
    return ProbeSet((_probe(p) for p in picked), str(path))


def _probe(pair: _Pair) -> Probe:
    return Probe(f"pref-{pair.index}", pair.prompt, pair.chosen, pair.rejected, prompt_messages=pair.messages)


def _check_bounds(min_len: int | None, max_len: int | None) -> None:
    for name, value in (("min_len", min_len), ("max_len", max_len)):
        if value is not None and value < 0:
            raise MarginscopeError(f"{name} must be non-negative; got {value}")
    if min_len is not None and max_len is not None and min_len > max_len:
        raise MarginscopeError(f"min_len ({min_len}) is greater than max_len ({max_len})")


def _within(length: int, min_len: int | None, max_len: int | None) -> bool:
    return (min_len is None or length >= min_len) and (max_len is None or length <= max_len)


def _lengths(pairs: list[_Pair], tokenizer: PreTrainedTokenizerBase | None, convention: str,
             source: str) -> list[int]:
    """Prompt + longer response of each pair, in tokens as scored under `convention`, or characters."""
    if tokenizer is None:
        return [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs]
    encoded = encode_probes(tokenizer, ProbeSet((_probe(p) for p in pairs), source), convention=convention)
    return [len(e.prompt_ids) + max(len(r) for r in e.response_ids) for e in encoded]


# ---------------------------------------------------------------------------------------- reading

def _records(path: Path, columns: tuple[str, ...]) -> Iterator[Record]:
    """The dataset's rows, each with its line (JSONL, CSV) or 1-based row number."""
    if path.is_dir():
        return _dataset_records(path, columns)
    if not path.exists():
        raise InputError("preference data not found", path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_records(path, columns)
    if suffix == ".csv":
        return _csv_records(path, columns)
    if suffix == ".parquet":
        return _parquet_records(path, columns)
    raise InputError(f"unsupported file type {suffix or '(no suffix)'!r}; expected {SUPPORTED}", path)


def _jsonl_records(path: Path, columns: tuple[str, ...]) -> Iterator[Record]:
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError("not valid UTF-8", path, number) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", path, number) from None
            if not isinstance(row, dict):
                raise InputError(f"expected a JSON object per line, found {_type_name(row)}", path, number)
            _require_columns(path, number, list(row), columns, "keys on this line")
            yield number, row


def _csv_records(path: Path, columns: tuple[str, ...]) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            _require_columns(path, 1, list(reader.fieldnames or []), columns, "the header has")
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError:
            raise InputError("not valid UTF-8", path, reader.line_num + 1) from None
        except csv.Error as err:
            raise InputError(f"not valid CSV: {err}", path, reader.line_num) from None


def _parquet_records(path: Path, columns: tuple[str, ...]) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MarginscopeError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        names = pq.read_schema(path).names
        _require_columns(path, None, names, columns, "the file has")
        rows = pq.read_table(path, columns=list(dict.fromkeys(columns))).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"not a readable Parquet file: {str(err).splitlines()[0]}", path) from None
    return enumerate(rows, 1)


def _dataset_records(path: Path, columns: tuple[str, ...]) -> Iterator[Record]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise MarginscopeError("reading a dataset folder needs datasets: pip install datasets") from None
    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"not a datasets.save_to_disk folder ({str(err).splitlines()[0]}); "
                         f"expected {SUPPORTED}", path) from None
    if isinstance(data, DatasetDict):
        data = _split(path, data)
    _require_columns(path, None, data.column_names, columns, "the dataset has")
    return enumerate(data.select_columns(list(dict.fromkeys(columns))).to_list(), 1)


def _split(path: Path, data: Mapping):
    """The "train" split of a DatasetDict, or its only split."""
    if "train" in data:
        return data["train"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise InputError(f"holds splits {', '.join(map(repr, data))} and none is 'train'; save one split "
                     "with Dataset.save_to_disk", path)


def _require_columns(path: Path, line: int | None, names: list[str], columns: tuple[str, ...], has: str) -> None:
    for column in columns:
        if column not in names:
            listing = ", ".join(map(repr, names)) or "none"
            raise InputError(f"no such column ({has}: {listing}); choose columns with "
                             "prompt_col/chosen_col/rejected_col (--prompt-col, …)", path, line, column)


# ----------------------------------------------------------------------------- rows → text pairs

def _pair(path: Path, index: int, where: int, row: Mapping[str, object], columns: tuple[str, ...],
          tokenizer: PreTrainedTokenizerBase | None) -> _Pair:
    """One row as text: plain strings verbatim; chat messages through the chat template."""
    prompt_col, chosen_col, rejected_col = columns

    def fail(reason: str, column: str) -> InputError:
        return InputError(reason, path, where, column)

    for column in columns:
        if not isinstance(row[column], (str, list)):
            raise fail(f"must be a string or a list of chat messages, found {_type_name(row[column])}", column)
    chosen, chosen_context = _response(row[chosen_col], chosen_col, fail)
    rejected, rejected_context = _response(row[rejected_col], rejected_col, fail)
    prompt = row[prompt_col]
    messages = _prompt_messages(prompt, prompt_col, chosen_context, rejected_context, rejected_col, fail)
    if messages is not None:
        prompt = _render(messages, tokenizer, prompt_col, fail)
    for column, text in ((prompt_col, prompt), (chosen_col, chosen), (rejected_col, rejected)):
        reason = _text_problem(text)
        if reason:
            raise fail(reason, column)
    if chosen == rejected:
        raise fail(f"identical to {chosen_col!r}; a preference pair needs two different responses", rejected_col)
    return _Pair(index, prompt, chosen, rejected, messages)


def _response(value: str | list, column: str, fail: Fail) -> tuple[str, list[dict] | None]:
    """(response text, the messages before it): a string as is; chat messages → the final
    assistant message's content and the conversation before it."""
    if isinstance(value, str):
        return value, None
    messages = _messages(value, column, fail)
    if not messages or messages[-1]["role"] != "assistant":
        raise fail("chat messages must end with an assistant message (the response)", column)
    return messages[-1]["content"], messages[:-1]


def _prompt_messages(prompt: str | list, column: str, chosen_context: list[dict] | None,
                     rejected_context: list[dict] | None, rejected_col: str, fail: Fail) -> list[dict] | None:
    """The chat messages of the prompt, or None for a plain-text row. A message list in the prompt
    column wins; else the conversation before the chosen answer; else the prompt string as the
    user turn when the responses are messages."""
    if isinstance(prompt, list):
        return _messages(prompt, column, fail)
    if chosen_context is None and rejected_context is None:
        return None
    if chosen_context or rejected_context:
        if chosen_context != rejected_context:
            raise fail("the conversation before the final message differs from the chosen one's", rejected_col)
        return chosen_context
    return [{"role": "user", "content": prompt}]


def _messages(value: list, column: str, fail: Fail) -> list[dict]:
    for k, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise fail(f"message {k} must be an object with string 'role' and 'content', found "
                       f"{json.dumps(message, default=str)[:80]}", column)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render(messages: list[dict], tokenizer: PreTrainedTokenizerBase | None, column: str, fail: Fail) -> str:
    """The prompt messages through the chat template, with the generation prompt; a BOS the template
    writes is dropped when the tokenizer adds one itself (the prompt is scored with special tokens)."""
    if tokenizer is None:
        raise fail("chat-format messages need a tokenizer with a chat template (tokenizer=, --tokenizer DIR)",
                   column)
    if not getattr(tokenizer, "chat_template", None):
        raise fail("chat-format messages need a chat template, and the tokenizer has none", column)
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError) as err:  # raise_exception() in templates is a TemplateError
        raise fail(f"the chat template fails on these messages: {str(err).splitlines()[0]}", column) from None
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text
