"""XConv inside the Lightning lifecycle: one callback converts a LightningModule's network.

Needs ``lightning`` (``import xconv`` alone does not import this module or Lightning)::

    trainer = L.Trainer(callbacks=[XConvCallback(probes=8)])   # or ConvertOptions(storage="quantized", bits=4)
    trainer.fit(MyModule(), datamodule)

To reload a trained, converted module with its XConv layers, restore them in the module's
``on_load_checkpoint``: ``def on_load_checkpoint(self, checkpoint): XConvCallback.restore(self, checkpoint)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
from torch import nn

from .checkpointing import checkpoint_modules
from .convert import convert
from .nn import _XConvMixin
from .options import ConvertOptions, merged_options
from .planner import plan_storage
from .storage_plan import LayerPlan, StoragePlan, check_budget

# Top-level key of the Lightning checkpoint that records the conversion, so that a reloaded module
# (LightningModule.load_from_checkpoint) gets the same layers without the callback.
CHECKPOINT_KEY = "xconv"


class XConvCallback(L.Callback):
    """Convert the LightningModule's convs (and ReLUs, BatchNorms, max-pools as the options say)
    with :func:`xconv.convert` in ``setup``, before the optimizers are built.

    Args:
        options: a :class:`xconv.ConvertOptions` (``None``: its defaults); ``**overrides`` replace its fields.
        modules: names of the submodules to convert (``"net"``, ``"generator"``); ``None``: the
            whole LightningModule.
        budget: a fraction in (0, 1] of plain-torch activation bytes: plan each XConv layer's
            storage on the first training batch (:func:`xconv.plan_storage`); needs ``loss``.
        loss: ``loss(net, batch) -> scalar`` of one training step through ``net`` (one of ``modules``,
            the only one); used by ``budget``. ``None``: the LightningModule's ``loss(batch, net=net)``.
        checkpointing: module-name patterns (fnmatch) of segments to run with activation
            checkpointing (:func:`xconv.checkpoint_modules`), applied after conversion.
        **overrides: fields of :class:`xconv.ConvertOptions` (``probes=8``, ``storage="quantized"``, ...).

    The options are logged as hyperparameters (``xconv/<name>``) and stored in every checkpoint
    under :data:`CHECKPOINT_KEY` with the storage plan. Converting is idempotent: a module
    already converted by this callback (:meth:`apply`) is left as it is.

    Raises:
        TypeError, ValueError: an invalid option or a ``budget`` outside (0, 1]; in :meth:`apply` (``setup``): the errors of
            :func:`xconv.convert` and :func:`xconv.plan_storage`, or ``modules`` that are not submodules.
    """

    def __init__(self, options: ConvertOptions | None = None, *, modules: Sequence[str] | str | None = None,
                 budget: float | None = None, loss: Callable | None = None, checkpointing: Sequence[str] | None = None,
                 **overrides):
        check_budget(budget)
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be None or a function loss(net, batch), got {loss!r}")
        # A subclass (a config schema with more keys) is kept as the plain options it holds.
        self.options = ConvertOptions(**merged_options(options, overrides).to_dict())
        self.modules = [modules] if isinstance(modules, str) else None if modules is None else list(modules)
        self.budget, self.loss = budget, loss
        self.checkpointing = None if checkpointing is None else list(checkpointing)
        self.storage_plan: StoragePlan | None = None
        self._logged = False

    def _targets(self, pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.modules is None:
            return [("", pl_module)]
        names = dict(pl_module.named_modules())
        missing = [name for name in self.modules if name not in names]
        if missing:
            raise ValueError(f"modules: {missing} are not submodules of {type(pl_module).__name__}")
        return [(name, names[name]) for name in self.modules]

    def apply(self, pl_module: nn.Module, datamodule: L.LightningDataModule | None = None) -> None:
        """Convert ``pl_module`` now (``setup`` calls this; a script may call it earlier to fail before any
        work), plan the storage on ``datamodule``'s first training batch where ``budget`` is set."""
        if getattr(pl_module, "_xconv_applied", False):
            return
        targets = self._targets(pl_module)
        planning = self.budget is not None and self.storage_plan is None
        if planning:  # what the plan needs is checked before anything is converted
            self._check_plan(pl_module, targets, datamodule)
        for i, (name, module) in enumerate(targets):
            new = convert(module, self.options)
            if new is not module:  # the target itself was a conv (or ReLU, BatchNorm, max-pool): put the new layer in
                parent, _, child = name.rpartition(".")
                setattr(pl_module.get_submodule(parent), child, new)
                targets[i] = (name, new)
        if planning:
            self.storage_plan = self._plan(pl_module, targets[0][1], datamodule)
        if self.storage_plan is not None:
            self.storage_plan.apply(targets[0][1])
        if self.checkpointing is not None:
            for _, module in targets:
                checkpoint_modules(module, self.checkpointing)
        pl_module._xconv_applied = True

    def _check_plan(self, pl_module, targets, datamodule) -> None:
        if len(targets) != 1:
            raise ValueError(f"budget: plans one network; give modules=[one name], got {self.modules}")
        if datamodule is None:
            raise ValueError("budget: plans on the datamodule's first training batch; fit with a datamodule "
                             "(trainer.fit(module, datamodule=...))")
        if self.loss is None and not callable(getattr(pl_module, "loss", None)):
            raise ValueError(f"budget: needs loss=loss(net, batch), or a method loss(batch, net=...) on "
                             f"{type(pl_module).__name__}")

    def _plan(self, pl_module, net, datamodule) -> StoragePlan:
        loss = self.loss or (lambda n, b: pl_module.loss(b, net=n))
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        return plan_storage(net, loss, batch, budget=self.budget)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module, trainer.datamodule)
        if self._logged:  # setup runs again for each later validate / test
            return
        self._logged = True
        for logger in trainer.loggers:
            logger.log_hyperparams({f"xconv/{k}": v for k, v in self.record().items() if k != "storage_plan"})

    def record(self) -> dict:
        """What the checkpoint keeps to rebuild the converted layers (JSON-ready)."""
        return {"modules": self.modules, "options": self.options.to_dict(), "budget": self.budget,
                "checkpointing": self.checkpointing,
                "storage_plan": None if self.storage_plan is None else self.storage_plan.to_dict()}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.record()

    @staticmethod
    def restore(pl_module: nn.Module, checkpoint: dict) -> None:
        """Convert ``pl_module`` as the run that wrote ``checkpoint`` did (options, storage plan,
        checkpointed segments); nothing where the checkpoint has no XConv record or ``pl_module`` holds
        XConv layers already (resuming a run whose callback converted it in ``setup``)."""
        record = checkpoint.get(CHECKPOINT_KEY)
        if record is None or any(isinstance(m, _XConvMixin) for m in pl_module.modules()):
            return
        callback = XConvCallback(ConvertOptions(**record["options"]), modules=record["modules"],
                                 checkpointing=record["checkpointing"])
        if (plan := record["storage_plan"]) is not None:  # as planned in training, not planned again
            layers = [LayerPlan(**{**layer, "input_shape": tuple(layer["input_shape"])}) for layer in plan["layers"]]
            callback.storage_plan = StoragePlan(plan["budget_bytes"], plan["plain_bytes"], plan["other_bytes"], layers)
        callback.apply(pl_module)
