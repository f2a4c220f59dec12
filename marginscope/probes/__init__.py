"""Probe sets: the preference pairs (and extra responses) whose training dynamics are measured.

    probes = marginscope.probes.load("probes.jsonl")   # raises InputError naming file:line: field
    probes = marginscope.probes.sentiment(64, style="long", seed=0)       # margin-pitfalls §4.2
    probes = marginscope.probes.arithmetic(16, seed=0)                    # bilevel SPO §2.3
    probes = marginscope.probes.from_preferences("prefs.parquet", n=100)  # a local preference dataset
    probes = marginscope.probes.top(probes, model, tokenizer)             # + the model's top output y*
"""

from .builders import (
    SENTIMENT_STYLES,
    Statement,
    arithmetic,
    sentiment,
    sentiment_response,
    sentiment_statements,
)
from .preferences import from_preferences
from .probeset import Probe, ProbeSet, load, problems, validate
from .top_output import top

__all__ = ["SENTIMENT_STYLES", "Probe", "ProbeSet", "Statement", "arithmetic", "from_preferences", "load",
           "problems", "sentiment", "sentiment_response", "sentiment_statements", "top", "validate"]
