"""One handler per layer type (Opacus `grad_sample/` style): each file defines a `Kind` whose
`factors(call, D)` returns the factored per-row gradient of the module's own parameters from its
captured inputs and output cotangent D. `KINDS` is the registry; the first kind that claims a module
wins, so the generic `ROWWISE` fallback comes last."""

from .embedding import EMBEDDING
from .linear import CONV1D, LINEAR
from .rowwise import ROWWISE, ROWWISE_MAX_NUMEL

KINDS = (LINEAR, CONV1D, EMBEDDING, ROWWISE)

__all__ = ["CONV1D", "EMBEDDING", "KINDS", "LINEAR", "ROWWISE", "ROWWISE_MAX_NUMEL"]
