"""`TRLCallback`: the tracker for `trl.DPOTrainer` 1.x, its loss read from the trainer's `DPOConfig`.

    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes="probes.jsonl", path="run.h5", every=10))
    trainer.train()

d_w/d_l follow `loss_type` (one or several, with `loss_weights`), `beta`, `label_smoothing` and
`discopop_tau` (`ms.losses.trl_loss`); settings whose loss is not a per-pair function of sequence
log-probs (WPO weighting, LD-DPO, batch-coupled loss types) raise at the start of training.

Probes are scored as the trainer scores its pairs (convention "trl"): their ids come from the
trainer's own `_prepare_dataset` (when `attach` gave the callback the trainer; TRL's otherwise) and
are truncated by TRL's collator to the DPOConfig's `max_length` / `truncation_mode`. Pass
`convention="separate"` (or max_length=..., truncation_mode=...) to the callback to override.

The reference is the trainer's: its `ref_model` when `attach` finds one; for a PEFT model without one,
the model with its adapters disabled (TRL's `use_adapter`, the "ref" adapter when the model has one),
so a run started from a trained adapter is compared with the base model, not with itself; else the
policy at the first record (a copy of the initial model is TRL's reference, also when it precomputes
reference log-probs, which it does with that same initial model before the first step).
"""

from __future__ import annotations

from typing import Any

from .. import losses as loss_zoo
from ..conventions import encode_probes
from ..dynamics.scoring import model_max_length
from ..probes import ProbeSet
from ..probes import load as load_probes
from .distributed import unwrap_model
from .hf import TrackerCallback


class TRLCallback(TrackerCallback):
    """`TrackerCallback` whose loss defaults to the trainer's DPOConfig loss, whose probes are
    tokenized and truncated by TRL's own data preparation, and whose reference is the trainer's."""

    def resolve_loss(self, args):
        if self.loss is not None:
            return self.loss
        return loss_zoo.trl_loss(
            args.loss_type, beta=args.beta, loss_weights=getattr(args, "loss_weights", None),
            label_smoothing=getattr(args, "label_smoothing", 0.0),
            discopop_tau=getattr(args, "discopop_tau", 0.05),
            f_divergence_type=str(getattr(args, "f_divergence_type", "reverse_kl")).split(".")[-1].lower(),
            use_weighting=getattr(args, "use_weighting", False), ld_alpha=getattr(args, "ld_alpha", None))

    def scoring_options(self, args, model, tokenizer) -> dict[str, Any]:
        """convention "trl" with the DPOConfig's max_length / truncation_mode, the ids prepared by the
        trainer itself, and TRL's adapter-disabled reference for a PEFT model without `ref_model`."""
        convention = self.tracker_options.get("convention", "trl")
        options: dict[str, Any] = {
            "convention": convention,
            "max_length": self.tracker_options.get("max_length", getattr(args, "max_length", None)),
            "truncation_mode": self.tracker_options.get("truncation_mode",
                                                        getattr(args, "truncation_mode", "keep_start"))}
        if convention == "trl" and "encoded" not in self.tracker_options:
            if not isinstance(self.probes, ProbeSet):
                self.probes = load_probes(self.probes)
            options["encoded"] = encode_probes(tokenizer, self.probes, **options, trainer=self.trainer,
                                               context_length=model_max_length(unwrap_model(model)))
        reference = self._peft_reference(model)
        if reference is not None and "ref_context" not in self.tracker_options:
            options["ref_context"] = reference
        return options

    def _peft_reference(self, model):
        """TRL's reference of a PEFT model without ref_model: the same model, adapters disabled."""
        if self.ref_model is not None or self.tracker_options.get("ref_logp") is not None:
            return None
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        model = unwrap_model(model)
        if not is_peft_model(model):
            return None
        return lambda: use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)
