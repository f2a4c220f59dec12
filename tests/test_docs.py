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
