"""Model paths: save_pretrained folders, GGUF files and folders holding one; one-line errors for the rest.

The GGUF files here are tiny hand-written ones (the `gguf` package's writer): enough to reach
transformers' GGUF reader and its refusals. The real GGUF model is loaded in tests/test_real_model.py.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from marginscope.cli import app
from marginscope.demo.tiny import save_tiny
from marginscope.errors import MarginscopeError
from marginscope.loading import CACHE_ENV, ModelSource, load_model, load_tokenizer, model_name, resolve_model


def _write_gguf(path, architecture: str):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_resolve_model_names_what_a_path_holds(tmp_path):
    hf = save_tiny(tmp_path / "hf")
    (hf / "stray.gguf").write_bytes(b"")  # config.json wins: a saved HF folder
    assert resolve_model(hf) == ModelSource(hf)
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.Q4.gguf").write_bytes(b"")
    assert resolve_model(one) == ModelSource(one, "m.Q4.gguf")
    assert resolve_model(one / "m.Q4.gguf") == ModelSource(one, "m.Q4.gguf")
    assert model_name(one) == str(one / "m.Q4.gguf") and model_name(hf) == str(hf)


@pytest.mark.parametrize("layout, message", [
    ({"a.gguf": b"", "b.gguf": b""}, "2 GGUF files (a.gguf, b.gguf); name one"),
    ({"notes.txt": b"x"}, "no config.json and no .gguf file"),
])
def test_folder_errors(tmp_path, layout, message):
    for name, data in layout.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(MarginscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MarginscopeError, match="expected a model directory .* or a .gguf file"):
        load_tokenizer(tmp_path / "weights.bin")


def test_a_corrupt_gguf_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    with pytest.raises(MarginscopeError, match=r"broken\.gguf: cannot load the GGUF file") as err:
        load_model(tmp_path / "broken.gguf")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("gguf/*/source.json"))  # nothing cached


def test_corrupt_weights_in_a_folder_are_one_line(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a truncated write
    with pytest.raises(MarginscopeError, match=r"tiny: cannot load the model: ") as err:
        load_model(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cache", ["off", "folder"])
def test_an_architecture_transformers_cannot_load_is_one_line(tmp_path, monkeypatch, cache):
    monkeypatch.setenv(CACHE_ENV, "off" if cache == "off" else str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "gptj.gguf", "gptj")
    for load in (load_model, load_tokenizer):
        with pytest.raises(MarginscopeError, match=r"gptj\.gguf: transformers .* cannot load this GGUF architecture: "
                                                   r".*gptj"):
            load(path)


def test_cli_reports_a_bad_gguf_file_in_one_line_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "off")
    path = _write_gguf(tmp_path / "gptj.gguf", "gptj")
    probes = tmp_path / "p.jsonl"
    probes.write_text('{"id": "a", "prompt": "x", "chosen": " y", "rejected": " z"}\n')
    res = CliRunner().invoke(app, ["measure", "--model", str(path), "--probes", str(probes)])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot load this GGUF architecture" in lines[0] and "Traceback" not in res.output


def test_gguf_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker))  # a file where the cache folder should be
    model_dir = save_tiny(tmp_path / "hf")
    from marginscope import loading

    model, tokenizer = loading.load_model(model_dir), loading.load_tokenizer(model_dir)
    monkeypatch.setattr(loading, "_model_from_gguf", lambda source, dtype: model)
    monkeypatch.setattr(loading, "_tokenizer_from_gguf", lambda source: tokenizer)
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(MarginscopeError, match=f"cannot write the GGUF conversion cache.*{CACHE_ENV}"):
        load_model(tmp_path / "m.gguf")


def test_gguf_cache_is_reused_and_names_the_file(tmp_path, monkeypatch):
    """The conversion runs once; later loads read the cached save_pretrained folder, in the dtype asked,
    with the GGUF file as the model's name (what traces record)."""
    import torch

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    from marginscope import loading

    model_dir = save_tiny(tmp_path / "hf")
    calls = []

    def convert(source, dtype):
        calls.append(source)
        return loading.load_model(model_dir)

    monkeypatch.setattr(loading, "_model_from_gguf", convert)
    monkeypatch.setattr(loading, "_tokenizer_from_gguf", lambda source: loading.load_tokenizer(model_dir))
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "tiny.gguf").write_bytes(b"")
    first = load_model(gguf_dir, dtype="float64")
    second = load_model(gguf_dir / "tiny.gguf")
    tok = load_tokenizer(gguf_dir)
    assert len(calls) == 1
    assert first.dtype == torch.float64 and second.dtype == torch.float32
    assert first.config._name_or_path == second.config._name_or_path == str(gguf_dir / "tiny.gguf")
    assert tok.name_or_path == str(gguf_dir / "tiny.gguf") and len(tok) == len(loading.load_tokenizer(model_dir))
    (gguf_dir / "tiny.gguf").write_bytes(b"changed")  # a new file (size, mtime): converted again
    load_model(gguf_dir)
    assert len(calls) == 2


def test_a_tokenizer_only_folder_loads_as_a_tokenizer(tmp_path):
    from marginscope.demo.tiny import build_tokenizer
    from marginscope.loading import load_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")("The movie")["input_ids"] == build_tokenizer()("The movie")["input_ids"]
