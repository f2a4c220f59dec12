"""The user-facing docs stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

import marginscope as ms

ROOT = Path(__file__).resolve().parents[1]


def test_every_loss_is_documented_with_its_defaults():
    text = (ROOT / "docs" / "losses.md").read_text()
    for name in ms.losses.names():
        loss = ms.losses.get(name)
        assert f"## `{name}`" in text, name
        defaults = ", ".join(f"{k}={v}" for k, v in loss.hparams.items())
        assert f"| `{name}` | {defaults} |" in text, name


def test_losses_doc_snippet_runs():
    text = (ROOT / "docs" / "losses.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(snippet, {})
        assert ms.losses.get("mine", tau=2.0).hparams == {"tau": 2.0}
    finally:
        ms.losses._REGISTRY.pop("mine", None)


def test_trace_format_doc_lists_every_record_dataset():
    from marginscope.trace.schema import _RECORD_FIELDS
    text = (ROOT / "docs" / "trace-format.md").read_text()
    assert f"schema version {ms.trace.SCHEMA_VERSION}" in text
    for name in _RECORD_FIELDS:
        assert f"| `{name}` |" in text, name


def test_readme_python_example_runs(tmp_path):
    """The README's first Python example, on a saved tiny model and the bundled demo probes."""
    from marginscope.demo.tiny import save_tiny
    model_dir = save_tiny(tmp_path / "ckpt")
    probes = ROOT / "marginscope" / "demo" / "probes.jsonl"
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    snippet = snippet.replace('"path/to/checkpoint"', repr(str(model_dir))).replace('"probes.jsonl"', repr(str(probes)))
    scope: dict = {}
    exec(snippet, scope)
    assert scope["case"].shape == (6,) and set(scope["case"]) <= {1, 2, 3, 4}
    assert scope["geo"].engine == "ghost" and scope["delta"].shape == (6, 2)
