"""Thin adapters between the tracker and training frameworks (imported on first use).

TrackerCallback and attach (HF Trainer), TRLCallback (trl.DPOTrainer), InRunMixin / InRunDPOTrainer
and InRunRecorder (in-run pair geometry inside
DPOTrainer's own step; needs trl), `distributed` helpers.
"""

from importlib import import_module

_WHERE = {"TrackerCallback": "hf", "attach": "hf", "TRLCallback": "trl",
          "InRunMixin": "trl_inrun", "InRunDPOTrainer": "trl_inrun", "InRunRecorder": "trl_inrun"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["InRunDPOTrainer", "InRunMixin", "InRunRecorder", "TRLCallback", "TrackerCallback", "attach"]
