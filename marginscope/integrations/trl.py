"""`TRLCallback`: the tracker for `trl.DPOTrainer` 1.x, its loss read from the trainer's `DPOConfig`.

    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    ms.integrations.attach(trainer, ms.integrations.TRLCallback(probes="probes.jsonl", path="run.h5", every=10))
    trainer.train()

d_w/d_l follow `loss_type` (one or several, with `loss_weights`), `beta`, `label_smoothing` and
`discopop_tau` (`ms.losses.trl_loss`); settings whose loss is not a per-pair function of sequence
log-probs (WPO weighting, LD-DPO, batch-coupled loss types) raise at the start of training.
The reference log-probs are those of the trainer's `ref_model` when `attach` finds one, else the
policy's at the first record: TRL's reference when none is given (a copy of the initial model, or the
base model under a fresh PEFT adapter).
"""

from __future__ import annotations

from .. import losses as loss_zoo
from .hf import TrackerCallback


class TRLCallback(TrackerCallback):
    """`TrackerCallback` whose loss defaults to the trainer's DPOConfig loss."""

    def resolve_loss(self, args):
        if self.loss is not None:
            return self.loss
        return loss_zoo.trl_loss(
            args.loss_type, beta=args.beta, loss_weights=getattr(args, "loss_weights", None),
            label_smoothing=getattr(args, "label_smoothing", 0.0),
            discopop_tau=getattr(args, "discopop_tau", 0.05),
            f_divergence_type=str(getattr(args, "f_divergence_type", "reverse_kl")).split(".")[-1].lower(),
            use_weighting=getattr(args, "use_weighting", False), ld_alpha=getattr(args, "ld_alpha", None))
