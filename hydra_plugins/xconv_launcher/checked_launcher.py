"""Hydra's basic (local, one job after another) launcher, which first checks every job's directory.

Hydra takes launchers only from its ``hydra_plugins`` namespace package; this portion of it is at
the repository root, which ``python run.py`` has on ``sys.path``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from experiments.cli import command_line_error
from experiments.config import (
    check_creatable, check_trainer_arguments, equal_memory_config, remove_created_output_dirs, remove_if_only,
    xconv_config,
)
from experiments.errors import ConfigError, exit_with


class CheckedLauncher(BasicLauncher):
    """``BasicLauncher`` that tries to create each job's directory (``hydra.sweep.dir`` joined with
    ``hydra.sweep.subdir``, resolved with the job's overrides and number) before the first job runs.

    Hydra creates a job's directory just before the job, outside any callback, so a directory that
    cannot be created (in ``/proc``, under a regular file) would end the sweep in a traceback after
    the jobs before it ran. Here the sweep stops at once in one line naming ``hydra.sweep.subdir``,
    exit status 2, and leaves no sweep directory; so does a job whose overrides do not compose
    (``xconv.mode=independent,bogus``) or whose xconv, equal_memory or trainer options are refused
    (``xconv.probes=8,-1``, ``trainer.max_epochs=2,abc``). The default (``configs/hydra/default.yaml``,
    ``configs/hydra/launcher/checked.yaml``).
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(config):
                    config.hydra.job.id = config.hydra.job.num = idx
                check_creatable("hydra.sweep.subdir", Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir))
                xconv_config(config)  # a value the schema's types let through (xconv.probes=-1)
                equal_memory_config(config)
                if "trainer" in config:
                    check_trainer_arguments(config.trainer)
            except (ConfigError, ConfigCompositionException) as err:  # as run.py: drop the sweep directory
                remove_if_only(Path(self.config.hydra.sweep.dir), {"multirun.yaml"})
                remove_created_output_dirs()
                exit_with(err if isinstance(err, ConfigError) else command_line_error(err))
        return super().launch(job_overrides, initial_job_idx)
