"""Progress bars for step-budgeted runs.

Lightning's `RichProgressBar` (its default where `rich` is installed) titles the training bar
"Epoch {e}/{max_epochs - 1}", which reads "Epoch 1/-2" when a run is budgeted in steps
(`max_epochs: -1`, every demo stage). `StepBudgetProgressBar` titles it with the step budget
instead: "Epoch 1 · step 512/600".
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepBudgetProgressBar(RichProgressBar):
    """`RichProgressBar` whose training title shows the global step against `max_steps`."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            description += f" · step {trainer.global_step}/{trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"
