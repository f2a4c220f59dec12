"""Probe files: loading, validation errors (file:line: field), ProbeSet API, canonical atomic writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marginscope.errors import InputError
from marginscope.probes import Probe, ProbeSet, load, problems, validate


def pair(pid: str = "p1", **over: object) -> dict[str, object]:
    """A valid record, with fields overridden (a value of None removes the field)."""
    record: dict[str, object] = {"id": pid, "prompt": f"Q {pid}?", "chosen": " yes", "rejected": " no"}
    record.update(over)
    return {k: v for k, v in record.items() if v is not None}


def write(tmp_path: Path, *lines: dict | str | bytes, name: str = "probes.jsonl") -> Path:
    """Write lines (dicts as JSON, str as UTF-8, bytes verbatim) to a JSONL file."""
    path = tmp_path / name
    encoded = (x if isinstance(x, bytes) else (json.dumps(x) if isinstance(x, dict) else x).encode()
               for x in lines)
    path.write_bytes(b"".join(x + b"\n" for x in encoded))
    return path


def error_of(path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return info.value


def assert_located(err: InputError, line: int | None, field: str | None, *words: str) -> None:
    message = str(err)
    assert err.line == line and err.field == field, message
    if line is not None:
        assert f":{line}: " in message, message
    if field is not None:
        assert f"field '{field}'" in message, message
    for word in words:
        assert word in message, message


@pytest.fixture
def with_top(tmp_path: Path) -> Path:
    return write(tmp_path, pair("a", extra={"top": " maybe", "alt": " perhaps"}),
                 pair("b", extra={"alt": " sure", "top": " never"}))


def test_load_pairs(tmp_path: Path) -> None:
    probes = load(write(tmp_path, pair("a"), "", pair("b"), "   "))
    assert len(probes) == 2 and probes.ids == ["a", "b"]
    assert probes.response_names == ["chosen", "rejected"] and probes.extra_names == []
    assert probes[0] == Probe("a", "Q a?", " yes", " no")
    assert probes[0].responses == {"chosen": " yes", "rejected": " no"}


def test_extra_order_follows_first_line(with_top: Path) -> None:
    probes = load(with_top)
    assert probes.extra_names == ["top", "alt"]
    assert probes.response_names == ["chosen", "rejected", "top", "alt"]
    assert list(probes.by_id("b").responses.items()) == [
        ("chosen", " yes"), ("rejected", " no"), ("top", " never"), ("alt", " sure")]


def test_sequence_api(tmp_path: Path) -> None:
    probes = load(write(tmp_path, *(pair(f"p{i}") for i in range(5))))
    assert [p.id for p in probes] == probes.ids
    assert probes[-1].id == "p4"
    part = probes[1:4:2]
    assert isinstance(part, ProbeSet) and part.ids == ["p1", "p3"] and part.source == probes.source
    assert probes.by_id("p2") is probes[2]
    with pytest.raises(KeyError, match="nope"):
        probes.by_id("nope")
    assert repr(probes) == (f"ProbeSet(5 probes, responses=['chosen', 'rejected'], "
                            f"source={str(tmp_path / 'probes.jsonl')!r})")


def test_round_trip_is_byte_identical(tmp_path: Path, with_top: Path) -> None:
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    load(with_top).to_jsonl(first)
    load(first).to_jsonl(second)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_text(encoding="utf-8").splitlines()[1] == (
        '{"id": "b", "prompt": "Q b?", "chosen": " yes", "rejected": " no", '
        '"extra": {"top": " never", "alt": " sure"}}')


def test_extra_is_omitted_when_empty(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    ProbeSet.from_records([pair("a", prompt="x", extra={})]).to_jsonl(out)
    assert out.read_bytes() == b'{"id": "a", "prompt": "x", "chosen": " yes", "rejected": " no"}\n'


def test_unicode_round_trip(tmp_path: Path) -> None:
    texts = {"prompt": "Überprüfe: 日本語 → ?", "chosen": " ok 😀", "rejected": ' "nein"\\\t'}
    out = tmp_path / "out.jsonl"
    ProbeSet.from_records([pair("ü-1", **texts)]).to_jsonl(out)
    assert "😀" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    probe = load(out)[0]
    assert (probe.id, probe.prompt, probe.chosen, probe.rejected) == ("ü-1", *texts.values())


def test_fingerprint(tmp_path: Path, with_top: Path) -> None:
    probes = load(with_top)
    out = tmp_path / "out.jsonl"
    probes.to_jsonl(out)
    assert load(out).fingerprint() == probes.fingerprint()
    assert len(probes.fingerprint()) == 64
    changed = ProbeSet.from_records([pair("a", chosen=" yes!")])
    assert changed.fingerprint() != ProbeSet.from_records([pair("a")]).fingerprint()
    assert probes[:1].fingerprint() != probes.fingerprint()


def test_atomic_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes = ProbeSet.from_records([pair("a"), pair("b")])
    dest = tmp_path / "probes.jsonl"
    dest.write_text("precious\n", encoding="utf-8")
    real_dumps, calls = json.dumps, []

    def failing_dumps(obj: object, **kwargs: object) -> str:
        calls.append(obj)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError, match="disk on fire"):
        probes.to_jsonl(dest)
    assert dest.read_text(encoding="utf-8") == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["probes.jsonl"]
    monkeypatch.undo()
    probes.to_jsonl(dest)
    assert load(dest).ids == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["probes.jsonl"]


def test_from_records_and_constructor_validate() -> None:
    with pytest.raises(InputError) as info:
        ProbeSet.from_records([pair("a"), pair("a")], source="mem")
    assert str(info.value) == "mem:2: field 'id': duplicate id 'a' (first used on line 1)"
    with pytest.raises(InputError, match="<records>: contains no probes"):
        ProbeSet.from_records([])
    with pytest.raises(InputError, match="field 'rejected'"):
        ProbeSet([Probe("a", "q", "same", "same")])


def test_with_extra(tmp_path: Path) -> None:
    probes = load(write(tmp_path, pair("a"), pair("b")))
    top = probes.with_extra("top", {"b": " B", "a": " A"})
    assert top.response_names == ["chosen", "rejected", "top"]
    assert top.by_id("a").extra == {"top": " A"} and probes.extra_names == []
    both = top.with_extra("alt", [" 1", " 2"])
    assert both.by_id("b").responses["alt"] == " 2" and both.extra_names == ["top", "alt"]


@pytest.mark.parametrize(("name", "texts", "words"), [
    ("top", {"a": " A"}, ["missing probe ids 'b'"]),
    ("top", {"a": " A", "b": " B", "c": " C"}, ["unexpected probe ids 'c'"]),
    ("top", [" A"], ["got 1 texts for 2 probes"]),
    ("top", [" A", "  "], ["probe 'b'", "empty"]),
    ("chosen", [" A", " B"], ["already exists"]),
    ("a/b", [" A", " B"], ["'/'"]),
])
def test_with_extra_errors(tmp_path: Path, name: str, texts: object, words: list[str]) -> None:
    probes = load(write(tmp_path, pair("a"), pair("b")))
    with pytest.raises(InputError) as info:
        probes.with_extra(name, texts)  # type: ignore[arg-type]
    assert_located(info.value, None, f"extra.{name}", *words)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert_located(error_of(tmp_path / "nope.jsonl"), None, None, "not found")
    assert_located(error_of(tmp_path), None, None, "directory")


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, pair("a"), b'{"id": "b\xff"}')
    assert_located(error_of(path), 2, None, "not valid UTF-8", "0xff", "column 10")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(pair("a")).encode() + b"\r\n")
    assert load(path).ids == ["a"]


@pytest.mark.parametrize(("lines", "line", "field", "words"), [
    (["", '{"id": "a", '], 2, None, ["not valid JSON", "column"]),
    (['["a", "b"]'], 1, None, ["expected a JSON object, found array"]),
    (['"text"'], 1, None, ["found string"]),
    ([pair("a"), '{"id": "b", "id": "c"}'], 2, "id", ["twice"]),
    ([pair("a", chosen=None)], 1, "chosen", ["missing"]),
    ([pair("a"), "", pair("b", prompt=3)], 3, "prompt", ["must be a string, found number"]),
    ([{**pair("a"), "rejected": None}], 1, "rejected", ["found null"]),
    ([pair("a", id=["x"])], 1, "id", ["found array"]),
    ([pair("a", prompt=" \t")], 1, "prompt", ["empty"]),
    ([pair("a", chosen="")], 1, "chosen", ["empty"]),
    ([pair("a", rejected="\n")], 1, "rejected", ["empty"]),
    ([pair("a", id="  ")], 1, "id", ["empty"]),
    (['{"id": "a", "prompt": "q", "chosen": "\\ud800", "rejected": "r"}'], 1, "chosen", ["surrogate"]),
    ([pair("a"), pair("b"), "", pair("a")], 4, "id", ["duplicate id 'a'", "line 1"]),
    ([pair("a", rejected=" yes")], 1, "rejected", ["identical to 'chosen'"]),
    ([pair("a", choosen=" y")], 1, "choosen", ["unknown field", "did you mean 'chosen'",
                                               "id, prompt, chosen, rejected, extra"]),
    ([pair("a", extra=["x"])], 1, "extra", ["must be an object", "found array"]),
    ([pair("a", extra={"top": ""})], 1, "extra.top", ["empty"]),
    ([pair("a", extra={"top": 1})], 1, "extra.top", ["found number"]),
    ([pair("a", extra={"chosen": " x"})], 1, "extra.chosen", ["reserved"]),
    ([pair("a", extra={"": " x"})], 1, "extra.", ["name is empty"]),
    ([pair("a", extra={"a/b": " x"})], 1, "extra.a/b", ["'/'"]),
    ([pair("a", extra={"a\nb": " x"})], 1, "extra.a\\nb", ["control"]),
    ([pair("a", extra={"top": " x"}), pair("b")], 2, "extra", ["missing names 'top'", "line 1"]),
    ([pair("a"), "", pair("b", extra={"top": " x"})], 3, "extra", ["unexpected names 'top'", "line 1"]),
    ([pair("a", extra={"top": " x"}), pair("b", extra={"alt": " x"})], 2, "extra",
     ["missing names 'top'", "unexpected names 'alt'"]),
])
def test_first_error_is_located(tmp_path: Path, lines: list[dict | str], line: int, field: str | None,
                                words: list[str]) -> None:
    assert_located(error_of(write(tmp_path, *lines)), line, field, *words)


@pytest.mark.parametrize("lines", [[], ["", "  ", "\t"]])
def test_no_probes(tmp_path: Path, lines: list[str]) -> None:
    assert_located(error_of(write(tmp_path, *lines)), None, None, "no probes")


def test_problems_lists_every_error_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, pair("a"), "{oops", pair("b", choosen=" x", chosen=None),
                 pair("a", prompt=""), b"\xfe", pair("c"))
    found = problems(path)
    assert [(e.line, e.field) for e in found] == [
        (2, None), (3, "choosen"), (3, "chosen"), (4, "prompt"), (4, "id"), (5, None)]
    assert all("\n" not in str(e) for e in found)
    assert str(error_of(path)) == str(found[0])
    assert problems(write(tmp_path, pair("a"), name="ok.jsonl")) == []
    assert [str(e) for e in problems(tmp_path / "nope.jsonl")] == [f"{tmp_path / 'nope.jsonl'}: probe file not found"]


def test_validate_returns_the_set(with_top: Path) -> None:
    assert validate(with_top).fingerprint() == load(with_top).fingerprint()
