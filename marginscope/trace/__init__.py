"""HDF5 traces: `ms.trace.open(path)` and the writer used by `measure` and the tracker."""

from .schema import SCHEMA_VERSION, Record, Trace, open_trace, write_trace

open = open_trace  # noqa: A001 — the public name is ms.trace.open(path)

__all__ = ["SCHEMA_VERSION", "Record", "Trace", "open", "open_trace", "write_trace"]
