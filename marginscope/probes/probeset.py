"""Probe sets: preference pairs (plus optional extra responses) read from and written to JSONL."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import overload

from ..errors import InputError

REQUIRED = ("id", "prompt", "chosen", "rejected")
ALLOWED = (*REQUIRED, "extra", "prompt_messages")
PAIR = ("chosen", "rejected")

_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number",
               str: "string", list: "array", dict: "object"}

Problem = tuple[str | None, str]  # (field, reason) found in one record


@dataclass(frozen=True)
class Probe:
    """One preference pair: a prompt, a chosen and a rejected response, and named extra responses.

    prompt_messages: the chat messages of a conversational pair ([{"role", "content"}, ...], the
    conversation before the response; each response is then one assistant message), kept so the pair
    can be scored through the chat template as a trainer does (convention "trl"); `prompt` is then
    the rendered prompt text (used by the "separate" convention and shown in figures). None for a
    plain-text pair.
    """

    id: str
    prompt: str
    chosen: str
    rejected: str
    extra: dict[str, str] = field(default_factory=dict)
    prompt_messages: list[dict[str, str]] | None = None

    @property
    def responses(self) -> dict[str, str]:
        """Response name → text: chosen, rejected, then the extra responses in the set's order."""
        return {"chosen": self.chosen, "rejected": self.rejected, **self.extra}

    def to_dict(self) -> dict[str, object]:
        """The JSONL record (keys id, prompt, chosen, rejected, extra; extra omitted when empty)."""
        record: dict[str, object] = {"id": self.id, "prompt": self.prompt,
                                     "chosen": self.chosen, "rejected": self.rejected}
        if self.extra:
            record["extra"] = dict(self.extra)
        if self.prompt_messages:
            record["prompt_messages"] = [dict(m) for m in self.prompt_messages]
        return record


class ProbeSet:
    """An ordered, validated collection of probes with unique ids and the same response names."""

    def __init__(self, probes: Iterable[Probe] = (), source: str = "<probes>") -> None:
        checked, errors = _check(enumerate((p.to_dict() for p in probes), 1), source)
        if errors:
            raise errors[0]
        self.source = source
        self._probes = tuple(checked)
        self._index = {p.id: i for i, p in enumerate(self._probes)}

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, object]], source: str = "<records>") -> ProbeSet:
        """Build from JSON-like dicts, validated like a file (record k is reported as line k)."""
        probes, errors = _check(enumerate(records, 1), source)
        if errors:
            raise errors[0]
        if not probes:
            raise _no_probes(source)
        return cls(probes, source)

    def __len__(self) -> int:
        return len(self._probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self._probes)

    @overload
    def __getitem__(self, key: int) -> Probe: ...

    @overload
    def __getitem__(self, key: slice) -> ProbeSet: ...

    def __getitem__(self, key: int | slice) -> Probe | ProbeSet:
        if isinstance(key, slice):
            return ProbeSet(self._probes[key], self.source)
        return self._probes[key]

    def __repr__(self) -> str:
        return f"ProbeSet({len(self)} probes, responses={self.response_names}, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        """Probe ids in order."""
        return list(self._index)

    def by_id(self, probe_id: str) -> Probe:
        """The probe with this id (KeyError if none)."""
        try:
            return self._probes[self._index[probe_id]]
        except KeyError:
            raise KeyError(f"no probe with id {probe_id!r} in {self.source}") from None

    @property
    def extra_names(self) -> list[str]:
        """Names of the extra responses, in file order (the same for every probe)."""
        return list(self._probes[0].extra) if self._probes else []

    @property
    def response_names(self) -> list[str]:
        """All response names: "chosen", "rejected", then the extra names."""
        return [*PAIR, *self.extra_names]

    def with_extra(self, name: str, texts: Mapping[str, str] | Sequence[str]) -> ProbeSet:
        """A new set with one more extra response per probe, given by probe id or in probe order."""
        label = f"extra.{_show(name)}"
        if name in self.response_names:
            raise InputError(f"response name {name!r} already exists in {self.source}", field=label)
        reason = _name_problem(name)
        if reason:
            raise InputError(reason, field=label)
        by_id = self._texts_by_id(texts, label)
        for probe_id, text in by_id.items():
            reason = _text_problem(text)
            if reason:
                raise InputError(f"probe {probe_id!r}: text {reason}", field=label)
        return ProbeSet((replace(p, extra={**p.extra, name: by_id[p.id]}) for p in self), self.source)

    def _texts_by_id(self, texts: Mapping[str, str] | Sequence[str], label: str) -> dict[str, str]:
        """Map `texts` (by id, or one per probe in order) onto this set's ids, in order."""
        if isinstance(texts, Mapping):
            missing = [i for i in self._index if i not in texts]
            unknown = [i for i in texts if i not in self._index]
            if missing or unknown:
                raise InputError(_difference(missing, unknown, "probe ids"), field=label)
            return {i: texts[i] for i in self._index}
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a dict id→text or a list of texts, not {type(texts).__name__}")
        if len(texts) != len(self):
            raise InputError(f"got {len(texts)} texts for {len(self)} probes", field=label)
        return dict(zip(self._index, texts))

    def _lines(self) -> Iterator[str]:
        """The canonical JSONL lines, newline-terminated."""
        for probe in self._probes:
            yield json.dumps(probe.to_dict(), ensure_ascii=False) + "\n"

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSONL content (identifies the probe set)."""
        digest = hashlib.sha256()
        for line in self._lines():
            digest.update(line.encode("utf-8"))
        return digest.hexdigest()

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write the canonical JSONL atomically: a temp file beside `path`, then os.replace."""
        dest = Path(path)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8", newline="\n") as out:
                out.writelines(self._lines())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load(path: str | os.PathLike[str]) -> ProbeSet:
    """Read and validate a probe file; raises the first problem as an InputError."""
    probes, errors = _parse(Path(path))
    if errors:
        raise errors[0]
    return ProbeSet(probes, str(path))


def validate(path: str | os.PathLike[str]) -> ProbeSet:
    """Check a probe file, raising its first problem (InputError); returns the loaded set."""
    return load(path)


def problems(path: str | os.PathLike[str]) -> list[InputError]:
    """Every problem in a probe file, in line order (empty when the file is valid)."""
    return _parse(Path(path))[1]


def _parse(path: Path) -> tuple[list[Probe], list[InputError]]:
    """Probes and problems of a file, problems sorted by line."""
    try:
        entries, errors = _read_entries(path)
    except InputError as err:
        return [], [err]
    probes, invalid = _check(entries, str(path))
    errors = sorted(errors + invalid, key=lambda e: e.line or 0)
    if not probes and not errors:
        errors = [_no_probes(str(path))]
    return probes, errors


def _read_entries(path: Path) -> tuple[list[tuple[int, object]], list[InputError]]:
    """(line number, parsed JSON) of each non-blank line, and the lines that could not be parsed."""
    entries: list[tuple[int, object]] = []
    errors: list[InputError] = []
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            errors.append(InputError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})",
                                     path, number))
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            entries.append((number, json.loads(text, object_pairs_hook=_unique_keys)))
        except json.JSONDecodeError as err:
            errors.append(InputError(f"not valid JSON: {err.msg} (column {err.colno})", path, number))
        except _DuplicateKey as err:
            errors.append(InputError("key appears twice in one JSON object", path, number, _show(err.key)))
    return entries, errors


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError("probe file not found", path) from None
    except IsADirectoryError:
        raise InputError("is a directory, expected a JSONL probe file", path) from None
    except OSError as err:
        raise InputError(f"cannot read probe file: {err.strerror}", path) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object_pairs_hook refusing repeated keys (json would silently keep the last)."""
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_probes(source: str) -> InputError:
    return InputError("contains no probes (expected one JSON object per line)", source)


def _check(entries: Iterable[tuple[int, object]], source: str) -> tuple[list[Probe], list[InputError]]:
    """Validate numbered records; returns the valid probes and every problem found."""
    checker = _Checker(source)
    for line, record in entries:
        checker.add(line, record)
    return checker.probes, checker.errors


class _Checker:
    """Validates records in order, keeping cross-record state: first line of each id, extra names."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.probes: list[Probe] = []
        self.errors: list[InputError] = []
        self._id_lines: dict[str, int] = {}
        self._extra_ref: tuple[int, list[str]] | None = None

    def add(self, line: int, record: object) -> None:
        if not isinstance(record, Mapping):
            found: list[Problem] = [(None, f"expected a JSON object, found {_type_name(record)}")]
        else:
            found = self._record_problems(line, record)
        self.errors.extend(InputError(reason, self.source, line, name) for name, reason in found)
        if not found:
            assert self._extra_ref is not None
            extra = {name: record["extra"][name] for name in self._extra_ref[1]}
            messages = record.get("prompt_messages")
            self.probes.append(Probe(*(record[k] for k in REQUIRED), extra=extra,
                                     prompt_messages=None if messages is None else [dict(m) for m in messages]))

    def _record_problems(self, line: int, record: Mapping[str, object]) -> list[Problem]:
        found = _unknown_fields(record) + _text_fields(record) + _messages_problems(record.get("prompt_messages"))
        extra = record.get("extra", {})
        extra_found = _extra_problems(extra)
        found += extra_found
        if "id" in record and _text_problem(record["id"]) is None:
            found += self._duplicate_id(line, record["id"])
        if not extra_found:
            found += self._extra_names(line, list(extra))
        return found

    def _duplicate_id(self, line: int, probe_id: str) -> list[Problem]:
        first = self._id_lines.setdefault(probe_id, line)
        return [] if first == line else [("id", f"duplicate id {probe_id!r} (first used on line {first})")]

    def _extra_names(self, line: int, names: list[str]) -> list[Problem]:
        """Every record must carry the extra names of the first record with a well-formed extra."""
        if self._extra_ref is None:
            self._extra_ref = (line, names)
            return []
        ref_line, expected = self._extra_ref
        missing = [n for n in expected if n not in names]
        unexpected = [n for n in names if n not in expected]
        if not (missing or unexpected):
            return []
        has = ", ".join(map(repr, expected)) if expected else "none"
        return [("extra", f"{_difference(missing, unexpected, 'names')}; every line needs the extra names "
                          f"of line {ref_line} ({has})")]


def _unknown_fields(record: Mapping[str, object]) -> list[Problem]:
    found: list[Problem] = []
    for key in record:
        if key not in ALLOWED:
            close = difflib.get_close_matches(str(key), ALLOWED, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            found.append((_show(str(key)), f"unknown field{hint}; allowed fields: {', '.join(ALLOWED)}"))
    return found


def _text_fields(record: Mapping[str, object]) -> list[Problem]:
    """Required fields present, non-empty strings, and chosen differing from rejected."""
    found: list[Problem] = []
    for key in REQUIRED:
        reason = _text_problem(record[key]) if key in record else f"missing (required: {', '.join(REQUIRED)})"
        if reason:
            found.append((key, reason))
    if not {k for k, _ in found} & set(PAIR) and record["chosen"] == record["rejected"]:
        found.append(("rejected", "identical to 'chosen'; a preference pair needs two different responses"))
    return found


def _messages_problems(messages: object) -> list[Problem]:
    """prompt_messages, when present: a non-empty list of {"role": str, "content": str} objects."""
    if messages is None:
        return []
    if not isinstance(messages, list) or not messages:
        return [("prompt_messages", f"must be a non-empty array of chat messages, found {_type_name(messages)}"
                                    + (" (empty)" if isinstance(messages, list) else ""))]
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"} \
                or not all(isinstance(message[key], str) for key in ("role", "content")):
            return [(f"prompt_messages[{k}]", "must be an object with exactly the string fields 'role' and "
                                              "'content'")]
    return []


def _extra_problems(extra: object) -> list[Problem]:
    if not isinstance(extra, Mapping):
        return [("extra", f"must be an object mapping response names to texts, found {_type_name(extra)}")]
    found: list[Problem] = []
    for name, text in extra.items():
        reason = _name_problem(name) or _text_problem(text)
        if reason:
            found.append((f"extra.{_show(str(name))}", reason))
    return found


def _text_problem(value: object) -> str | None:
    """Why `value` is not a usable text, or None."""
    if not isinstance(value, str):
        return f"must be a string, found {_type_name(value)}"
    if not value.strip():
        return "is empty or whitespace-only"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate escape (not valid Unicode)"
    return None


def _name_problem(name: object) -> str | None:
    """Why `name` cannot name an extra response, or None."""
    if not isinstance(name, str):
        return f"response name must be a string, found {_type_name(name)}"
    if name in PAIR:
        return f"response name '{name}' is reserved for the pair itself"
    if not name:
        return "response name is empty"
    if "/" in name or any(c.isspace() or not c.isprintable() for c in name):
        return "response name must not contain '/', whitespace or control characters"
    return None


def _difference(missing: list[str], unexpected: list[str], what: str) -> str:
    parts = [f"missing {what} {_listing(missing)}" if missing else "",
             f"unexpected {what} {_listing(unexpected)}" if unexpected else ""]
    return "; ".join(p for p in parts if p)


def _listing(items: list[str], limit: int = 5) -> str:
    """Up to `limit` quoted items, then how many more."""
    shown = ", ".join(map(repr, items[:limit]))
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _type_name(value: object) -> str:
    """JSON name of a value's type (number, array, ...), else the Python type name."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _show(text: str) -> str:
    """`text` with non-printable characters escaped, safe inside a one-line message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
