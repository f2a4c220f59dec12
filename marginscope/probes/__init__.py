"""Probe sets: the preference pairs (and extra responses) whose training dynamics are measured.

    probes = marginscope.probes.load("probes.jsonl")   # raises InputError naming file:line: field
"""

from .probeset import Probe, ProbeSet, load, problems, validate

__all__ = ["Probe", "ProbeSet", "load", "problems", "validate"]
