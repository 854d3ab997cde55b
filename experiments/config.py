"""Run-configuration checks that must fail before any training starts."""
from __future__ import annotations

import dataclasses
import functools
import pickle
import re
import shutil
import typing
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException
from pydantic import ConfigDict, TypeAdapter, ValidationError

from xconv import ConvertOptions
from xconv.lightning import CHECKPOINT_KEY

from .equal_memory import check_equal_memory
from .errors import ConfigError, exit_with


def check_run_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a mandatory key (``???`` in a config) left unset, an interpolation
    that does not resolve (a data set of another task), a seed that is not an int, a ``trainer`` argument
    of another type than the Trainer's (:func:`check_trainer_arguments`) or an ``output_dir`` that cannot
    be created (see :func:`check_output_dir`).

    ``ckpt_path`` is checked apart (:func:`check_checkpoint`), as its weights are compared with
    the task's once the task is built (:func:`check_checkpoint_fits`)."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves every interpolation on the way
    except InterpolationResolutionError as err:
        # e.g. a data set of another task: the model asks for ${data.in_channels}, which it lacks.
        raise ConfigError(f"{err.full_key}: {str(err.msg).splitlines()[0]} (do the task, data and model configs fit together?)") from err
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} must be set, e.g. on the command line: {example}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an int, got {cfg.seed!r}")
    if "trainer" in cfg:
        check_trainer_arguments(cfg.trainer)
    check_output_dir(cfg.output_dir)
    check_no_earlier_run("output_dir", cfg.output_dir, cfg.get("ckpt_path"))


@functools.cache
def _trainer_argument_types() -> dict[str, tuple[TypeAdapter, str]]:
    """Per argument of ``lightning.Trainer``: a strict validator of its annotation ("4" is not an int
    here, nor 1 a bool) and the annotation's allowed values in words."""
    strict = ConfigDict(arbitrary_types_allowed=True, strict=True)
    return {name: (TypeAdapter(hint, config=strict), _in_words(hint))
            for name, hint in typing.get_type_hints(L.Trainer.__init__).items() if name != "return"}


def _built_by_hydra(value) -> bool:
    """Whether ``value`` is or holds a ``_target_`` node, which Hydra turns into an object."""
    if isinstance(value, dict):
        return "_target_" in value or any(_built_by_hydra(v) for v in value.values())
    return isinstance(value, list) and any(_built_by_hydra(v) for v in value)


def _in_words(hint) -> str:
    """``Optional[Literal['a', 'b'] | int]`` as "'a', 'b', int or None"."""
    def alternatives(tp):
        if typing.get_origin(tp) is typing.Union:
            return [a for arg in typing.get_args(tp) for a in alternatives(arg)]
        if typing.get_origin(tp) is typing.Literal:
            return [repr(value) for value in typing.get_args(tp)]
        if tp is type(None):
            return ["None"]
        return [getattr(tp, "__name__", str(tp)) if not typing.get_args(tp)
                else re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(tp))]  # list[lightning....Logger] -> list[Logger]
    words = list(dict.fromkeys(alternatives(hint)))
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check_trainer_arguments(trainer: DictConfig) -> None:
    """Raise :class:`ConfigError` for a ``trainer.<argument>`` whose value is not of the type
    ``lightning.Trainer`` annotates it with (e.g. ``trainer.max_epochs=abc``, which Lightning would
    only trip over in the middle of ``fit``). Strictly: ``"4"`` and ``3.0`` are no ints, ``1`` and ``"yes"``
    no bools. Unknown arguments are left to the Trainer, which refuses them; so are objects Hydra builds
    (``_target_`` nodes) and values that do not resolve yet (``${output_dir}`` in the sweep launcher)."""
    types = _trainer_argument_types()
    for name in trainer:
        if name not in types:
            continue
        try:
            value = trainer[name]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:  # e.g. ${output_dir} in the sweep launcher: checked when the job runs
            continue
        if not _built_by_hydra(value):
            validator, allowed = types[name]
            try:
                validator.validate_python(value)
            except ValidationError:
                raise ConfigError(f"trainer.{name} must be {allowed} (lightning.Trainer's type), got {value!r}") from None


def check_no_earlier_run(key: str, directory: str | Path, ckpt_path: str | None) -> None:
    """Raise :class:`ConfigError` naming ``key`` where ``directory`` holds an earlier run (its
    ``summary.json`` or a checkpoint in ``checkpoints/``) and ``ckpt_path`` does not resume one:
    a new run there would overwrite that run's checkpoints and summary."""
    directory = Path(directory)
    held = [name for name, found in [("summary.json", (directory / "summary.json").is_file()),
                                     ("checkpoints", any((directory / "checkpoints").glob("*.ckpt")))] if found]
    if held and ckpt_path is None:
        raise ConfigError(
            f"{key}: {str(directory)!r} holds an earlier run ({' and '.join(held)}), which a new run would overwrite: "
            f"resume it with ckpt_path={directory / 'checkpoints' / 'last.ckpt'}, or give another {key}"
        )


def check_output_dir(path: str) -> None:
    """Raise :class:`ConfigError` naming ``output_dir`` unless the directory exists or can be created.

    Normally it is Hydra's run directory, which exists by now; one set by hand (``output_dir=...``)
    is created and removed again (with the parents this made), as the loggers and checkpoints
    create it when they first write.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(f"output_dir must be a directory path, got {path!r}")
    check_creatable("output_dir", path)


def check_creatable(key: str, path: str | Path) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless the directory ``path`` exists or can be
    created; what this creates is removed again, innermost first (see :func:`make_directory`)."""
    for directory in reversed(make_directory(key, path)):
        try:
            directory.rmdir()
        except OSError:  # written to meanwhile: leave it
            break


def make_directory(key: str, path: str | Path) -> list[Path]:
    """Create the directory ``path`` and its missing parents; return those it created, outermost first.

    Raises:
        ConfigError: naming ``key``, where the directory cannot be created (in ``/proc``, under
            a regular file, no permission).
    """
    path = Path(path)
    try:
        created = [p.absolute() for p in (path, *path.parents) if not p.exists()][::-1]
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise ConfigError(f"{key}: cannot create the directory {str(path)!r}: {err.strerror or err}{where}") from err
    return created


def check_checkpoint(path: str) -> tuple[dict[str, tuple[int, ...] | None], dict | None]:
    """Raise :class:`ConfigError` naming ``ckpt_path`` unless ``path`` is a Lightning checkpoint that loads;
    return the shape of each entry of its ``state_dict`` (None for an entry that is no tensor) and
    its XConv record (:meth:`xconv.lightning.XConvCallback.record`; None if it has none).

    Loads it as ``Trainer.fit(ckpt_path=...)`` will (Lightning's ``TorchCheckpointIO``, torch's
    default ``weights_only``), onto the CPU: a truncated or foreign file, or one whose pickled
    structure is damaged, fails here, in one line, before anything is built, rather than in
    ``fit`` after the run has started. Damaged tensor data that still loads is not detected. The
    shapes are for :func:`check_checkpoint_fits`, once the task is built; the file is read once
    more by ``fit`` (a fraction of a second for this project's checkpoints).
    """
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path: no checkpoint file at {path!r}")
    try:
        checkpoint = TorchCheckpointIO().load_checkpoint(path, map_location="cpu")
    except Exception as err:  # torch.load raises what its unpickler or zip reader raises: no one type
        # The weights-only unpickler wraps the real reason (e.g. "Unsupported operand 23") in advice.
        reason = err.__context__ if isinstance(err, pickle.UnpicklingError) and err.__context__ else err
        first = str(reason).split(". ")[0].splitlines()[0] if str(reason).strip() else "file ends early"
        raise ConfigError(
            f"ckpt_path: cannot load {path!r} as a checkpoint ({type(reason).__name__}: {first})"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path: {path!r} is no Lightning checkpoint (it has no 'state_dict'; a bare model state_dict?)")
    return _shapes(checkpoint["state_dict"]), checkpoint.get(CHECKPOINT_KEY)


def xconv_change(path: str, before: dict | None, now: dict) -> str | None:
    """A one-line warning where a run resumed from ``path`` converts its network otherwise than the
    run that saved it (``before``, the checkpoint's XConv record; ``now``, this run's), else None:
    legitimate (e.g. finishing with exact gradients), but easy to do by accident, as when a task's
    default ``xconv`` changed since the checkpoint was written. None too for a checkpoint without a record."""
    if before is None:
        return None
    changed = {}
    if "budget" in before and before["budget"] != now["budget"]:  # records of earlier versions lack it
        changed["xconv.budget"] = (before["budget"], now["budget"])
    changed |= {f"xconv.{key}": (value, now["options"].get(key)) for key, value in before["options"].items()
                if now["options"].get(key) != value}
    if before.get("checkpointing") != now["checkpointing"]:
        changed["checkpointing"] = (before.get("checkpointing"), now["checkpointing"])
    if not changed:
        return None
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
    return f"ckpt_path: this run goes on with other XConv settings than the run that saved {path!r}: {listed}"


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...] | None]:
    return {key: tuple(value.shape) if isinstance(value, torch.Tensor) else None for key, value in state_dict.items()}


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_checkpoint_fits(path: str, shapes: dict[str, tuple[int, ...] | None], task: L.LightningModule) -> None:
    """Raise :class:`ConfigError` naming ``ckpt_path`` unless the checkpoint's ``state_dict`` (its
    ``shapes``, from :func:`check_checkpoint`) loads into ``task`` as ``Trainer.fit`` loads it.

    The same keys as ``task.state_dict()`` (unless ``task.strict_loading`` is False: then only
    the keys both have) and the same shapes; the message names the first few that differ. A
    checkpoint of another model or task (a small_cnn checkpoint for ``model=resnet18_cifar``)
    fails here, before anything runs, instead of in ``fit``. Optimizer and scheduler states are
    not compared.
    """
    expected = _shapes(task.state_dict())
    strict = getattr(task, "strict_loading", True)
    missing = [k for k in expected if k not in shapes] if strict else []
    unexpected = [k for k in shapes if k not in expected] if strict else []
    resized = [f"{k} ({_size(shapes[k])} in the checkpoint, {_size(expected[k])} here)" for k in expected
               if k in shapes and expected[k] is not None and shapes[k] is not None and shapes[k] != expected[k]]
    if not (missing or unexpected or resized):
        return
    parts = [f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}" for what, keys in
             [("keys missing", missing), ("unexpected keys", unexpected), ("of another shape", resized)] if keys]
    raise ConfigError(
        f"ckpt_path: {path!r} does not fit the task's network (a checkpoint of another model, task or "
        f"xconv setting?): {'; '.join(parts)}"
    )


class MakeOutputDir(Callback):
    """Hydra callback: create the run (or sweep) directory before Hydra does, and stop in one line if it cannot.

    Hydra creates ``hydra.run.dir`` (``hydra.sweep.dir`` in a sweep) outside the task function,
    where a path in ``/proc`` or under a regular file ended in a traceback. This runs before
    Hydra writes anything; a run directory that holds an earlier run is refused here too, unless
    ``ckpt_path`` resumes a run (:func:`check_no_earlier_run`); the ``.hydra/`` files of a run
    resumed into its directory are kept, to be written back by :func:`restore_earlier_hydra_files`
    if the run stops on a later check (a ``ckpt_path`` that does not load or fit, a bad value); a
    sweep's job directories are checked by ``CheckedLauncher`` (``hydra_plugins/xconv_launcher/``). Hydra turns
    a callback's exceptions into warnings and carries on, so the error exits here, as ``run.py``
    exits on any :class:`ConfigError` (:func:`exit_with`).
    Registered in ``configs/hydra/default.yaml`` (``hydra.callbacks``).
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:  # before Hydra writes .hydra/ over an earlier run's
            check_no_earlier_run("hydra.run.dir", config.hydra.run.dir, config.get("ckpt_path"))
        except ConfigError as err:
            exit_with(err)
        self._make("hydra.run.dir", config.hydra.run.dir)
        if config.hydra.output_subdir is not None:
            hydra_dir = Path(config.hydra.run.dir) / config.hydra.output_subdir
            files = hydra_dir.iterdir() if hydra_dir.is_dir() else ()
            EARLIER_HYDRA_FILES[hydra_dir] = {p.name: p.read_bytes() for p in files if p.is_file()}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._make("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _make(key: str, path: str) -> None:
        try:
            CREATED_OUTPUT_DIRS[:] = make_directory(key, path)
        except ConfigError as err:
            exit_with(err)


# The directories MakeOutputDir created for this process's run or sweep directory (that one and
# its missing parents, outermost first), for remove_created_output_dirs.
CREATED_OUTPUT_DIRS: list[Path] = []


# The .hydra/ files of an earlier run in this run's directory (a run resumed into it), as they were
# before Hydra rewrote them, for restore_earlier_hydra_files.
EARLIER_HYDRA_FILES: dict[Path, dict[str, bytes]] = {}


def restore_earlier_hydra_files() -> None:
    """Put back the earlier run's ``.hydra/`` files (removing any it did not have, and the folder if
    it had none) after a run resumed into its directory stopped on a :class:`ConfigError` (a
    checkpoint that does not fit, a bad value): Hydra rewrote them with a command line that never
    ran, and the earlier run's record of its config is not to be lost."""
    for hydra_dir, files in EARLIER_HYDRA_FILES.items():
        for path in hydra_dir.iterdir() if hydra_dir.is_dir() else ():
            if path.is_file() and path.name not in files:
                path.unlink()
        for name, content in files.items():
            (hydra_dir / name).write_bytes(content)
        if not files and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()


def remove_if_only(directory: Path, names: set[str]) -> None:
    """Delete ``directory`` if every entry in it is one of ``names`` (what Hydra writes before a job runs)."""
    if directory.is_dir() and {p.name for p in directory.iterdir()} <= names:
        shutil.rmtree(directory)


def remove_created_output_dirs() -> None:
    """Delete the directories :class:`MakeOutputDir` created, innermost first, as long as they are empty.

    After a run stopped by a :class:`ConfigError` has removed its run directory, this removes
    the parents that the run created for it (``outputs/<task>/``, ``outputs/``), but none that
    existed before or that hold anything.
    """
    for directory in reversed(CREATED_OUTPUT_DIRS):
        if directory.is_dir():
            if any(directory.iterdir()):
                break
            directory.rmdir()


def launcher_kind(strategy) -> str | None:
    """How ``strategy`` starts its other processes: ``"multiprocessing"`` (``torch.multiprocessing``:
    ddp_spawn, ddp_fork, ddp_notebook), ``"script"`` (running the command line again, unless the
    cluster starts every process: ddp) or None (one process, or processes started by the cluster).

    Lightning says this only through private launcher classes; they are imported here alone, so
    a Lightning release that renames them breaks this function and its test, nothing else.
    """
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

    launcher = strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        return "multiprocessing"
    if isinstance(launcher, _SubprocessScriptLauncher) and not launcher.cluster_environment.creates_processes_externally:
        return "script"
    return None


def check_launcher(trainer: L.Trainer, multirun: bool, task: L.LightningModule | None = None) -> None:
    """Raise :class:`ConfigError` for a ``trainer.strategy`` whose processes ``run.py`` cannot run,
    or that ``task`` cannot train with.

    - ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` train in processes started for each
      ``fit``/``validate``/``test`` call, and what ``run.py`` reads afterwards stays there (the
      summary's timer and throughput callbacks, the data module's splits); ``trainer.validate``
      after ``fit`` even fails in the CSV logger.
    - ``ddp`` starts each extra process by running ``sys.argv`` again. In a Hydra sweep (``-m``)
      that command is the whole sweep: every child runs all the jobs again, in step with the
      parent's only by luck, and writes a second sweep directory. Where something else starts
      every process, nothing is re-run: under ``hydra/launcher=slurm`` each sweep job is a SLURM
      job whose tasks (one per device) all run that one job as the ranks of its DDP.
    - A task whose backward passes leave some parameters without gradients (the GAN's
      discriminator update: ``ddp_unused_parameters = True``) fails in DDP's reducer after
      its first step unless DDP looks for unused parameters.
    """
    kind, name = launcher_kind(trainer.strategy), type(trainer.strategy).__name__
    if kind == "multiprocessing":
        raise ConfigError(
            f"trainer.strategy: a {name} whose processes torch.multiprocessing starts (ddp_spawn, ddp_fork, "
            "ddp_notebook) does not work in run.py: what the run summary reads stays in those processes; "
            "use trainer.strategy=ddp"
        )
    if multirun and kind == "script":
        raise ConfigError(
            f"trainer.strategy: {name} starts its other processes by re-running the command line, which in a "
            "sweep (-m) would run the whole sweep again in each; sweep DDP jobs with hydra/launcher=slurm "
            "(SLURM starts the processes), or start the runs one by one without -m"
        )
    # Lightning keeps the DDP constructor's arguments in a private field; nothing public says.
    if (getattr(task, "ddp_unused_parameters", False) and isinstance(trainer.strategy, DDPStrategy)
            and not trainer.strategy._ddp_kwargs.get("find_unused_parameters", False)):
        raise ConfigError(
            f"trainer.strategy: {type(task).__name__} updates parts of its network in separate backward passes, "
            "which DDP must be told about: use trainer.strategy=ddp_find_unused_parameters_true"
        )


# xconv options that only the paper's sketch reads.
SKETCH_OPTIONS = ("probes", "mode", "distribution", "per_sample", "contraction", "deflation", "deflation_rank",
                  "max_compression")


def xconv_config(cfg: DictConfig, overrides: list[str] | None = None) -> ConvertOptions:
    """``cfg.xconv`` as the dataclass of its schema (``experiments.registry.XConvConfig``: the options of
    ``xconv.convert`` and ``budget``), or a :class:`ConfigError` naming the key of a value it refuses.

    OmegaConf has checked the types and choices when the config was composed; the dataclass checks
    the rest (ranges, combinations) before anything is built. First, a sketch option set on the
    command line (``overrides``; None: the run's, from ``cfg.hydra`` or Hydra's runtime config)
    while the convs keep SR storage (``storage=quantized`` without a budget, as ``xconv=sr4``, the
    default of some tasks) is refused: it would change nothing, where the user meant the paper's sketch.
    """
    options = [f.name for f in dataclasses.fields(OmegaConf.get_type(cfg.xconv))]
    if unknown := sorted(set(cfg.xconv) - set(options)):  # added with +xconv.<key>=..., which the schema lets through
        raise ConfigError(f"xconv.{unknown[0]}: no such option; the options: {', '.join(options)}")
    if cfg.xconv.storage == "quantized" and cfg.xconv.budget is None:
        _check_no_sketch_overrides(cfg, overrides)
    try:
        return OmegaConf.to_object(cfg.xconv)
    except (TypeError, ValueError) as err:
        # OmegaConf wraps a TypeError of the dataclass in its own error; the dataclass's message names the option.
        reason = err.__context__ if isinstance(err, OmegaConfBaseException) and err.__context__ is not None else err
        raise ConfigError(f"xconv.{reason}") from reason


def _check_no_sketch_overrides(cfg: DictConfig, overrides: list[str] | None) -> None:
    hydra = cfg.hydra if "hydra" in cfg else HydraConfig.get() if HydraConfig.initialized() else None
    if overrides is None:
        overrides = list(hydra.overrides.task) if hydra is not None else []
    sketch_keys = {f"xconv.{name}" for name in SKETCH_OPTIONS}
    if named := [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.key_or_group in sketch_keys]:
        choice = hydra.runtime.choices.get("xconv") if hydra is not None else None
        hint = ("drop xconv.storage=quantized" if choice == "default" else
                f"xconv={choice}; add xconv=default" if choice else "add xconv=default")
        raise ConfigError(f"{named[0]}: a sketch option, unused with xconv.storage=quantized ({hint} for the paper's sketch)")


def equal_memory_config(cfg: DictConfig) -> dict | None:
    """``cfg.equal_memory`` (null, or ``{fraction, batch_size}``: experiments/equal_memory.py) as keyword
    arguments of ``match_batch_size``, or a :class:`ConfigError` naming the key (no data is needed: a
    sweep's launcher checks every job with it before the first trains)."""
    node = cfg.get("equal_memory")
    if node is None:
        return None
    if not OmegaConf.is_dict(node) or set(node) != {"fraction", "batch_size"}:
        given = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        raise ConfigError(f"equal_memory must be null or {{fraction: F, batch_size: B}}, got {given!r}")
    try:
        check_equal_memory(node.fraction, node.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return {"fraction": node.fraction, "reference_batch_size": node.batch_size}


def checkpointing_patterns(cfg: DictConfig) -> list[str] | None:
    """``cfg.checkpointing`` as a list of module-name patterns for ``xconv.checkpoint_modules``, or None (off).

    Whether they match the network's modules is checked when it is built (``experiments.build.build``).
    """
    value = cfg.get("checkpointing")
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) else None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError("checkpointing must be null or a list of module-name patterns, e.g. "
                          f"checkpointing=[encoder.layer*,decoder.blocks.*], got {value!r}")
    return patterns
