"""What this project registers with Hydra and OmegaConf before a config is composed: the schema of the
``xconv`` group and the ``${sweep_dir:}`` and ``${xconv_name:}`` resolvers. Registered by :func:`register`,
never on import."""
from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from xconv.options import ConvertOptions
from xconv.storage_plan import check_budget


@dataclass
class XConvConfig(ConvertOptions):
    """The ``xconv`` config group (``configs/xconv/``): the options of ``xconv.convert``
    (:class:`xconv.ConvertOptions`, whose field types OmegaConf checks when the config is composed)
    and ``budget``, the byte budget of ``xconv.lightning.XConvCallback``: a fraction in (0, 1] of
    plain-torch activation bytes, or None (no planning).

    Raises:
        TypeError, ValueError: on construction (``OmegaConf.to_object(cfg.xconv)``), a value the
            types let through but the options refuse (``probes=-3``, ``bits=3``, ``budget=2``).
    """

    budget: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_budget(self.budget)


def sweep_dir() -> str | None:
    """The sweep directory of a Hydra sweep (``-m``) job; None in a single run or outside a Hydra app.

    Registered as the ``${sweep_dir:}`` resolver, for the W&B logger's ``group``: the jobs of one
    sweep share it, a single run gets none. Unlike ``${hydra:sweep.dir}``, it also resolves
    where no Hydra app runs (configs composed in tests and scripts).
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().sweep.dir


def xconv_name(xconv) -> str:
    """A short name of the ``xconv`` options, for run directories and W&B run names: ``plan<budget>`` (the
    byte-budget planner), ``sr<bits>`` (SR storage), else ``probes<r>`` (the sketch; ``probes0``: exact).

    Registered as the ``${xconv_name:${xconv}}`` resolver (``configs/hydra/default.yaml``, ``configs/logger/wandb.yaml``).
    """
    if xconv.get("budget") is not None:
        return f"plan{xconv.budget:g}"
    if xconv.get("storage") == "quantized":
        return f"sr{xconv.bits}"
    return f"probes{xconv.probes}"


def register() -> None:
    """Store :class:`XConvConfig` as ``xconv_schema`` in Hydra's ConfigStore (``configs/xconv/default.yaml``
    extends it) and register ``${sweep_dir:}`` and ``${xconv_name:}`` with OmegaConf. Call it before composing ``configs/``
    (``run.py`` does, as do the tests and scripts that compose it); later calls change nothing."""
    # Outside the xconv group, so that it is no choice of xconv=...: the group's configs extend it.
    ConfigStore.instance().store(name="xconv_schema", node=XConvConfig)
    if not OmegaConf.has_resolver("sweep_dir"):
        OmegaConf.register_new_resolver("sweep_dir", sweep_dir)
    if not OmegaConf.has_resolver("xconv_name"):
        OmegaConf.register_new_resolver("xconv_name", xconv_name)
