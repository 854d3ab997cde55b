"""Runs beyond one process, at tiny sizes on CPU: DDP over 2 gloo processes, W&B groups of a sweep, submitit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra_helpers import REPO_ROOT, TINY_CLASSIFICATION, TINY_SEGMENTATION, compose_config
from test_run import check_summary

from experiments.errors import ConfigError
from experiments.config import check_launcher, launcher_kind
from experiments.tasks.base import rank_seed
from run import build

DDP = ["trainer.strategy=ddp", "trainer.devices=2"]
# tests/run_probe.py: per rank, the first probe seed of training, the final parameters, the W&B run.
PROBE = "+callbacks.probe._target_=tests.run_probe.RunProbe"


def run_py(*overrides: str, cwd) -> subprocess.CompletedProcess:
    """``run.py`` with ``overrides`` in a new process; ``tests`` importable there (for ``PROBE``), W&B offline."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def with_logger(overrides: list[str], logger: str) -> list[str]:
    return [*overrides, f"logger={logger}"]  # after debug=tiny's csv: the command line wins


@pytest.mark.parametrize(
    "task, overrides", [("segmentation", with_logger(TINY_SEGMENTATION, "csv")),
                        ("classification", with_logger(TINY_CLASSIFICATION, "wandb"))],
)
def test_ddp_ranks_keep_equal_parameters_and_draw_their_own_probes(task, overrides, tmp_path):
    result = run_py(*overrides, *DDP, PROBE, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    check_summary(json.loads((tmp_path / "summary.json").read_text()), task, probes=8, steps=2)
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1" in output  # two processes did train
    assert output.count("; summary: ") == 1  # only rank 0 wrote and logged the summary

    ranks = [torch.load(tmp_path / f"probe_rank{rank}.pt") for rank in (0, 1)]
    params = [record["params"] for record in ranks]
    assert params[0].keys() == params[1].keys()
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), name
    # Each rank draws its probes from its own stream, seeded from (seed, rank).
    assert ranks[0]["probe_seed"] != ranks[1]["probe_seed"]
    assert [record["torch_seed"] for record in ranks] == [rank_seed(0, 0), rank_seed(0, 1)]
    if "logger=wandb" in overrides:  # one W&B run, from rank 0; a single run has no sweep group
        assert ranks[0]["wandb"]["group"] == "" and ranks[1]["wandb"] is None  # "": wandb's Run.group for none
        assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def test_rank_seeds_are_a_function_of_seed_and_rank():
    seeds = {(seed, rank): rank_seed(seed, rank) for seed in (0, 1, 2) for rank in (0, 1, 2)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(rank_seed(seed, rank) == value for (seed, rank), value in seeds.items())


def test_ddp_in_a_sweep_exits_2_before_training_and_leaves_no_sweep_dir(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_py("-m", *TINY_CLASSIFICATION, *DDP, "xconv=default", "xconv.probes=0,8", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: trainer.strategy: ") and "hydra/launcher=slurm" in error
    assert "GLOBAL_RANK" not in result.stdout + result.stderr  # no second process was started
    assert not sweep_dir.exists()


def test_ddp_in_a_sweep_is_allowed_where_slurm_starts_the_processes(monkeypatch):
    # What a job of hydra/launcher=slurm sees in each of its tasks (rank 0 of 2 on one node).
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "run", "SLURM_NODELIST": "node1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    assert trainer.strategy.cluster_environment.creates_processes_externally
    check_launcher(trainer, multirun=True)


@pytest.mark.parametrize("strategy, devices, kind", [
    ("ddp_spawn", 2, "multiprocessing"), ("ddp_fork", 2, "multiprocessing"), ("ddp", 2, "script"), ("auto", 1, None),
])
def test_launcher_kind_reads_how_lightning_starts_the_processes(strategy, devices, kind):
    """The one place that reads Lightning's private launcher classes: a release renaming them fails here."""
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, devices=devices, logger=False)
    assert launcher_kind(trainer.strategy) == kind


def test_sweep_jobs_are_separate_wandb_runs_in_one_group(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = with_logger(TINY_CLASSIFICATION, "wandb")
    result = run_py("-m", *overrides, PROBE, "xconv=default", "xconv.probes=0,8", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [sweep_dir / "0_probes0", sweep_dir / "1_probes8"]
    runs = [torch.load(job / "probe_rank0.pt")["wandb"] for job in jobs]
    assert runs[0]["id"] != runs[1]["id"]
    assert runs[0]["group"] == runs[1]["group"] == str(sweep_dir)
    for job, wandb_run in zip(jobs, runs):
        assert [p.name.rpartition("-")[2] for p in (job / "wandb").glob("offline-run-*")] == [wandb_run["id"]]


def test_submitit_local_sweep_runs_every_job(tmp_path):
    # submitit's local executor runs each job in its own process, as on SLURM, without SLURM.
    sweep_dir = tmp_path / "sweep"
    result = run_py("-m", *TINY_CLASSIFICATION, "hydra/launcher=submitit_local", "xconv=default", "xconv.probes=0,8",
                    f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, probes in enumerate([0, 8]):
        summary = json.loads((sweep_dir / f"{job}_probes{probes}" / "summary.json").read_text())
        check_summary(summary, "classification", probes, steps=2)
    assert (sweep_dir / ".submitit").is_dir()


@pytest.mark.parametrize("strategy, error", [("ddp", True), ("ddp_find_unused_parameters_true", False)])
def test_gan_needs_ddp_to_find_unused_parameters(strategy, error, tmp_path):
    # D's update leaves G without gradients; plain DDP would fail after the first step.
    cfg = compose_config("task=gan", "data.image_size=16", "debug=tiny", f"trainer.strategy={strategy}",
                         "trainer.devices=2", output_dir=tmp_path)
    if error:
        with pytest.raises(ConfigError, match="trainer.strategy: GANTask .* use trainer.strategy=ddp_find_unused_parameters_true"):
            build(cfg)
    else:
        build(cfg)
