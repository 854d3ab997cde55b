"""Lightning loggers, adjusted where the pinned versions disagree."""
from __future__ import annotations

from lightning.pytorch import loggers


class WandbLogger(loggers.WandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous`` argument to ``wandb.init``.

    wandb 0.31 ignores ``anonymous`` and warns whenever it is passed; Lightning 2.6 always
    passes it (``None`` when unset), so every run printed the warning.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous")
