"""HDF5 traces: `ms.trace.open(path)`, the SWMR writer behind the tracker, and `write_trace`.

One module, `schema.py`, owns the layout (documented in docs/trace-format.md).
"""

from .schema import SCHEMA_VERSION, Record, Trace, TraceWriter, nonfinite_probes, open_trace, write_trace
from .summary import TraceSummary, summarize

open = open_trace  # noqa: A001 — the public name is ms.trace.open(path)

__all__ = ["SCHEMA_VERSION", "Record", "Trace", "TraceSummary", "TraceWriter", "nonfinite_probes", "open",
           "open_trace", "summarize", "write_trace"]
