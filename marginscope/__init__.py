"""marginscope: training-dynamics diagnostics for DPO and margin-based preference optimization.

    import marginscope as ms
    probes = ms.probes.load("probes.jsonl")
    geo = ms.dynamics.measure(model, tokenizer, probes)
    loss = ms.losses.get("dpo", beta=0.1)
    d_w, d_l = ms.dynamics.coefficients(loss, logp_w, logp_l, ref_w, ref_l, len_w, len_l)
    case = ms.dynamics.classify(geo.gram, d_w, d_l)
    with ms.Tracker(model, tokenizer, probes, path="run.h5", loss=loss, every=10) as tracker:
        ...  # training loop: tracker.step(step) after each optimizer step
"""

from importlib.metadata import PackageNotFoundError, version

from . import conventions, dynamics, integrations, losses, plots, probes, report, reproduce, trace, train
from .dynamics import measure
from .errors import InputError, MarginscopeError
from .tracker import Tracker

try:
    __version__ = version("marginscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["InputError", "MarginscopeError", "Tracker", "__version__", "conventions", "dynamics", "integrations", "losses", "measure",
           "plots", "probes", "report", "reproduce", "trace", "train"]
