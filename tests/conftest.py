"""Shared fixtures: a locally trained tokenizer, tiny random-init models, probe sets, oracles."""

from __future__ import annotations

import pytest
import torch

from marginscope.demo.tiny import build_model, build_tokenizer
from marginscope.probes import ProbeSet

# Unequal lengths on purpose: one- to many-token responses, short and long prompts.
PROBE_RECORDS = [
    {"id": "p0", "prompt": "The movie was wonderful. The sentiment is", "chosen": " positive.",
     "rejected": " negative, and it was a bad one.", "extra": {"top": " great"}},
    {"id": "p1", "prompt": "Bad", "chosen": " no", "rejected": " yes it is fine",
     "extra": {"top": " maybe not so much"}},
    {"id": "p2", "prompt": "This phone failed every expectation. The sentiment is", "chosen": " negative.",
     "rejected": " positive.", "extra": {"top": " negative"}},
]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def probes() -> ProbeSet:
    return ProbeSet.from_records(PROBE_RECORDS)


@pytest.fixture
def make_model(tokenizer):
    def make(arch: str = "gpt2", dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs):
        return build_model(arch, tokenizer, dtype=dtype, seed=seed, **kwargs)
    return make
