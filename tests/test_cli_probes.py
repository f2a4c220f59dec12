"""`marginscope probes …` end to end, and its one-line errors (exit 2, no traceback, no output file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from marginscope.demo.tiny import save_tiny
from marginscope.loading import load_model, load_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "model", arch="gpt2")


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, *needles: str) -> None:
    """Exit 2 with exactly one stderr line `error: …` containing every needle, and no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Traceback" not in res.output


def no_output_files(folder: Path) -> bool:
    return not list(folder.glob("out*")) and not list(folder.glob(".out*"))


@pytest.mark.parametrize("command", [
    ["probes"], ["probes", "build"], ["probes", "build", "sentiment"], ["probes", "build", "arithmetic"],
    ["probes", "from-preferences"], ["probes", "top"], ["probes", "validate"], ["probes", "show"],
])
def test_help(command):
    res = run(*command, "--help")
    assert res.exit_code == 0, res.output
    assert command == ["probes"] or command == ["probes", "build"] or "Example" in res.stdout


# ---------------------------------------------------------------------------------------- build

def test_build_sentiment_writes_the_library_set(tmp_path):
    out = tmp_path / "out.jsonl"
    res = run("probes", "build", "sentiment", "--style", "long", "--n", 8, "--seed", 3, "-o", out)
    assert res.exit_code == 0, res.output
    assert f"wrote 8 probes to {out}" in res.stdout
    ms.probes.sentiment(8, style="long", seed=3).to_jsonl(tmp_path / "ref.jsonl")
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_build_arithmetic_writes_the_library_set(tmp_path):
    out = tmp_path / "out.jsonl"
    res = run("probes", "build", "arithmetic", "--n", 5, "--pairs-per-question", 2, "-o", out)
    assert res.exit_code == 0, res.output
    ms.probes.arithmetic(5, seed=0, pairs_per_question=2).to_jsonl(tmp_path / "ref.jsonl")
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


@pytest.mark.parametrize("args,needles", [
    (["sentiment", "--style", "huge"], ["style", "'huge'"]),
    (["sentiment", "--n", "0"], ["n must be between 1"]),
    (["sentiment", "--n", "-3"], ["n must be between 1"]),
    (["arithmetic", "--n", "0"], ["n_questions must be between 1"]),
    (["arithmetic", "--pairs-per-question", "9"], ["pairs_per_question"]),
])
def test_build_bad_options(tmp_path, args, needles):
    res = run("probes", "build", *args, "-o", tmp_path / "out.jsonl")
    assert_user_error(res, *needles)
    assert no_output_files(tmp_path)


def test_build_bad_output_paths(tmp_path):
    res = run("probes", "build", "sentiment", "-o", tmp_path / "missing" / "out.jsonl")
    assert_user_error(res, "does not exist")
    res = run("probes", "build", "sentiment", "-o", tmp_path)
    assert_user_error(res, "is a directory")


# ----------------------------------------------------------------------------- from-preferences

ROWS = [{"question": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(6)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_from_preferences(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    res = run("probes", "from-preferences", data, "--n", 3, "--seed", 1, "--prompt-col", "question",
              "--tokenizer", model_dir, "--max-len", 100, "-o", out)
    assert res.exit_code == 0, res.output
    expected = ms.probes.from_preferences(data, 3, 1, prompt_col="question", tokenizer=load_tokenizer(model_dir),
                                          max_len=100)
    assert ms.probes.load(out).fingerprint() == expected.fingerprint()


@pytest.mark.parametrize("args,needles", [
    ([], ["field 'prompt'", "no such column", "'question'", "'chosen'"]),  # wrong column name
    (["--prompt-col", "question", "--chosen-col", "good"], ["field 'good'", "no such column"]),
    (["--prompt-col", "question", "--n", "0"], ["n must be at least 1"]),
    (["--prompt-col", "question", "--n", "7"], ["only 6 pairs", "n=7"]),
    (["--prompt-col", "question", "--min-len", "9", "--max-len", "3"], ["greater than max_len"]),
    (["--prompt-col", "question", "--tokenizer", "MISSING"], ["does not exist"]),
])
def test_from_preferences_mistakes(tmp_path, args, needles):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    args = [str(tmp_path / "missing-tok") if a == "MISSING" else a for a in args]
    res = run("probes", "from-preferences", data, *args, "-o", tmp_path / "out.jsonl")
    assert_user_error(res, *needles)
    assert no_output_files(tmp_path)


def test_from_preferences_file_mistakes(tmp_path, model_dir):
    out = tmp_path / "out.jsonl"
    res = run("probes", "from-preferences", tmp_path / "none.jsonl", "-o", out)
    assert_user_error(res, "none.jsonl", "not found")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, "{oops"])
    res = run("probes", "from-preferences", bad, "-o", out)
    assert_user_error(res, f"{bad}:2:", "not valid JSON")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                                  "chosen": "b", "rejected": "c"}])
    res = run("probes", "from-preferences", chat, "--tokenizer", model_dir, "-o", out)
    assert_user_error(res, f"{chat}:1:", "field 'prompt'", "chat template")
    assert no_output_files(tmp_path)


# ------------------------------------------------------------------------------------------ top

def test_top_greedy_and_sample_equal_the_library(tmp_path, model_dir):
    probes = tmp_path / "probes.jsonl"
    ms.probes.arithmetic(2, seed=0, pairs_per_question=2).to_jsonl(probes)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    for extra in ([], ["--method", "sample", "--k", "3", "--seed", "4"]):
        out = tmp_path / "out.jsonl"
        res = run("probes", "top", probes, "--model", model_dir, "--max-new-tokens", 6, *extra, "-o", out)
        assert res.exit_code == 0, res.output
        assert res.stderr == ""  # no progress bar residue when stderr is not a terminal
        options = dict(method="sample", k=3, seed=4) if extra else {}
        expected = ms.probes.top(ms.probes.load(probes), model, tok, max_new_tokens=6, **options)
        assert ms.probes.load(out).fingerprint() == expected.fingerprint()


def test_top_mistakes(tmp_path, model_dir):
    probes = tmp_path / "probes.jsonl"
    ms.probes.sentiment(2, seed=0).to_jsonl(probes)
    bare = tmp_path / "bare"
    load_model(model_dir).save_pretrained(bare)
    out = tmp_path / "out.jsonl"
    assert_user_error(run("probes", "top", probes, "--model", bare, "-o", out), "no tokenizer", str(bare))
    assert_user_error(run("probes", "top", probes, "--model", tmp_path / "nope", "-o", out), "does not exist")
    assert_user_error(run("probes", "top", tmp_path / "none.jsonl", "--model", model_dir, "-o", out),
                      "none.jsonl", "not found")
    assert_user_error(run("probes", "top", probes, "--model", model_dir, "--method", "beam", "-o", out), "method")
    assert_user_error(run("probes", "top", probes, "--model", model_dir, "--method", "sample", "--k", "0",
                          "-o", out), "k must be at least 1")
    assert_user_error(run("probes", "top", probes, "--model", model_dir, "-o", tmp_path / "no" / "out.jsonl"),
                      "does not exist")
    assert no_output_files(tmp_path)
    taken = tmp_path / "taken.jsonl"
    ms.probes.load(probes).with_extra("top", [" a", " b"]).to_jsonl(taken)
    assert_user_error(run("probes", "top", taken, "--model", model_dir, "-o", out), "'top' already exists")
    assert no_output_files(tmp_path)


# ------------------------------------------------------------------------------- validate, show

def test_validate_ok(tmp_path):
    probes = tmp_path / "probes.jsonl"
    ms.probes.sentiment(4, seed=0).with_extra("top", [" a"] * 4).to_jsonl(probes)
    res = run("probes", "validate", probes)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"{probes}: OK, 4 probes, responses chosen, rejected, top"


def test_validate_lists_every_problem(tmp_path):
    good = {"id": "a", "prompt": "p", "chosen": " x", "rejected": " y"}
    probes = write_jsonl(tmp_path / "probes.jsonl", [good, '{"id": "b", "prompt": ', {**good, "id": "c", "chosen": 3},
                                                     {**good, "id": "a"}])
    res = run("probes", "validate", probes)
    assert res.exit_code == 2
    assert res.stdout.strip().splitlines() == [
        f"{probes}:2: not valid JSON: Expecting value (column 23)",
        f"{probes}:3: chosen: must be a string, found number",
        f"{probes}:4: id: duplicate id 'a' (first used on line 1)",
    ]
    assert res.stderr.strip() == f"error: 3 problems in {probes}"


def test_validate_missing_or_empty_file(tmp_path):
    assert_user_error(run("probes", "validate", tmp_path / "none.jsonl"), "none.jsonl", "not found")
    assert_user_error(run("probes", "validate", tmp_path), "not a file")
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    res = run("probes", "validate", empty)
    assert res.exit_code == 2 and "contains no probes" in res.stdout


def test_show(tmp_path):
    probes = tmp_path / "probes.jsonl"
    ms.probes.sentiment(12, style="short", seed=0).to_jsonl(probes)
    res = run("probes", "show", probes, "--n", 3)
    assert res.exit_code == 0, res.output
    assert "3 of 12 probes" in res.stdout and "sentiment-short-2" in res.stdout
    assert "sentiment-short-3" not in res.stdout and "' It has a" in res.stdout


def test_show_mistakes(tmp_path):
    probes = write_jsonl(tmp_path / "probes.jsonl", ['{"id": "a"'])
    assert_user_error(run("probes", "show", probes), f"{probes}:1:", "not valid JSON")
    assert_user_error(run("probes", "show", tmp_path / "none.jsonl"), "not found")
    assert_user_error(run("probes", "show", probes, "--n", 0), "--n must be at least 1")
