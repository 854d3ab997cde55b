"""Build a run's data module, task and Trainer from its config, or stop with a one-line ConfigError."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from xconv.lightning import XConvCallback

from .config import (
    check_checkpoint, check_checkpoint_fits, check_launcher, check_run_config, checkpointing_patterns, equal_memory_config,
    xconv_change, xconv_config,
)
from .equal_memory import check_matchable, match_batch_size
from .errors import ConfigError
from .registry import register
from .summary import summary_callbacks

log = logging.getLogger(__name__)


def _user_key(cfg: DictConfig, full_key: str) -> str:
    """The config key a user would write for node ``full_key``: ``task.net`` filled by ``${model}`` is ``model``."""
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    raw = OmegaConf.to_container(parent, resolve=False).get(leaf) if isinstance(parent, DictConfig) else None
    whole_node = isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw.count("${") == 1
    return raw[2:-1] if whole_node else full_key


def _named(cfg: DictConfig, key: str, message: str) -> str:
    """``message`` of node ``key``'s constructor, which starts with its argument's name, prefixed with
    the key a user sets: ``data.root: ...``, or ``model.channels: ...`` for the task's ``net.channels: ...``
    (an argument the task builds from ``${model}``, see ``XConvTask``)."""
    argument = message.split(":", 1)[0].split(".", 1)[0].split(" ", 1)[0]
    source = _user_key(cfg, f"{key}.{argument}") if argument in cfg[key] else f"{key}.{argument}"
    if source != f"{key}.{argument}":
        return source + message[len(argument):]
    return f"{key}.{message}"


def instantiate_node(cfg: DictConfig, key: str, **kwargs):
    """``instantiate(cfg[key])``; a constructor's complaint about an argument becomes a ConfigError.

    Constructors here start such messages with the argument name, so prefixing the config node
    gives the full key (``data.root: ...``); the objects a task builds from its arguments' configs
    (the model, from ``${model}``) are named by the key the user sets: ``model.channels: ...``.
    """
    try:
        return instantiate(cfg[key], **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if key == "trainer" and isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            # Lightning's Trainer writes sentences ("Precision 'fp8' is invalid..."), not "<argument>: ...".
            raise ConfigError(f"trainer: {cause}") from cause
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            raise ConfigError(_named(cfg, key, str(cause))) from cause
        if isinstance(cause, KeyError):  # e.g. smp's unknown encoder name
            raise ConfigError(f"{key}: {cause.args[0]}") from cause
        raise


@contextmanager
def _held_back(*names: str) -> Iterator[None]:
    """Hold back what the loggers ``names`` log in the block, and log it once the block ends without an error.

    A config error found after ``xconv.convert`` (a checkpoint that does not fit, ``checkpointing``
    patterns, ``xconv.budget``) is then the only line a refused run prints, not the last after
    "xconv.convert: N convs converted".
    """
    loggers, held = [logging.getLogger(name) for name in names], []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
    for record in held:  # not reached on an error: those records are dropped
        logging.getLogger(record.name).handle(record)


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data module, converted task and Trainer, built after ``seed_everything(cfg.seed)``, or a ConfigError
    before anything trains."""
    register()  # ${sweep_dir:}, for a config composed elsewhere (a script, a notebook)
    with _held_back("xconv.convert", "xconv.planner"):
        return _assemble(cfg)


def _converter(cfg: DictConfig) -> XConvCallback:
    options = xconv_config(cfg)
    return XConvCallback(options, modules="net", budget=options.budget, checkpointing=checkpointing_patterns(cfg))


def _convert(converter: XConvCallback, task: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """The callback's conversion, now rather than in ``setup``: a pattern or budget that does not fit the
    network then stops the run before the Trainer and its loggers write anything."""
    try:
        converter.apply(task, datamodule)
    except ValueError as err:  # options are checked already; what is left names the network's modules or the budget
        message = str(err)
        if message.startswith("include: no module matches"):  # from xconv.checkpoint_modules
            raise ConfigError(f"checkpointing: {message.partition(': ')[2]}") from err
        raise ConfigError(f"xconv.{message}") from err


def _assemble(cfg: DictConfig):
    check_run_config(cfg)
    equal_memory = equal_memory_config(cfg)
    ckpt_path = cfg.get("ckpt_path")
    checkpoint_shapes, checkpoint_xconv = check_checkpoint(ckpt_path) if ckpt_path is not None else (None, None)
    converter = _converter(cfg)
    # Before anything random is built; quietly, so that a config error is the only line printed
    # (the seed is in the run's config and summary).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate_node(cfg, "data")
    # The task builds its network and optimizer from their configs, and keeps those as its hyperparameters.
    task = instantiate_node(cfg, "task", _recursive_=False)
    try:
        task.check_data(datamodule)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _convert(converter, task, datamodule)
    if equal_memory is not None:
        try:
            check_matchable(datamodule, equal_memory["reference_batch_size"])
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if checkpoint_shapes is not None:  # the network as it is trained: converted, with its checkpointed segments
        check_checkpoint_fits(ckpt_path, checkpoint_shapes, task)
        if (change := xconv_change(ckpt_path, checkpoint_xconv, converter.record())) is not None:
            log.warning(change)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    max_time = cfg.trainer.get("max_time")  # a string, a dict of timedelta's arguments, or a timedelta node
    max_time = instantiate(max_time, _convert_="all") if isinstance(max_time, DictConfig) else max_time
    *timing, summary = summary_callbacks(f"{cfg.output_dir}/summary.json", config, max_time=max_time)
    callbacks += [converter, *timing, summary]
    trainer = instantiate_node(cfg, "trainer", logger=loggers or False, callbacks=callbacks, max_time=None)
    check_launcher(trainer, multirun=HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN, task=task)
    if equal_memory is not None:  # measured as the summary measures: on the Trainer's device, in its precision
        summary.equal_memory = match_batch_size(task, datamodule, **equal_memory, device=trainer.strategy.root_device,
                                                precision=trainer.precision_plugin)
    return datamodule, task, trainer


def has_test_stage(task: L.LightningModule, datamodule: L.LightningDataModule) -> bool:
    """Whether the data has a held-out test split (a ``test_set``, after setup) and the task scores it."""
    return is_overridden("test_step", task) and getattr(datamodule, "test_set", None) is not None
