"""End-to-end runs at tiny sizes: summary.json for every task; checkpoints, resume and multirun (segmentation)."""
from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra_helpers import REPO_ROOT, TINY, TINY_CLASSIFICATION, TINY_SEGMENTATION, compose_config, config_names

import experiments.summary as summary_module
import xconv
from experiments.errors import ConfigError
from experiments.summary import activation_memory
from experiments.tasks import ClassificationTask, SegmentationTask
from run import build, run

SUMMARY_FIELDS = {
    "task", "probes", "mode", "distribution", "metric_name", "metric_mode", "metric", "metrics", "activation_bytes",
    "activation_bytes_exact", "peak_memory_bytes", "train_time_s", "samples_per_s", "epochs", "steps",
    "device", "precision", "world_size", "seed", "git_commit", "config", "checkpointing", "checkpointed_modules",
}

# Per task: the overrides of a tiny run, its headline metric and other metrics its summary holds.
TASKS = {
    "segmentation": (TINY_SEGMENTATION, "val/mIoU", {"val/dice", "val/loss", "val/IoU/background", "val/dice/digit_9"}),
    "classification": (TINY_CLASSIFICATION, "val/acc", {"val/loss", "test/acc", "test/loss"}),
}


def check_summary(summary: dict, task: str, probes: int, steps: int) -> None:
    _, metric_name, other_metrics = TASKS[task]
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["task"] == task and summary["probes"] == probes
    assert summary["config"]["xconv"]["probes"] == probes
    # Every xconv option at top level, in the words of the config and of xconv.ConvertOptions.
    assert {**xconv.ConvertOptions().to_dict(), "budget": None}.keys() <= summary.keys()
    assert {key: summary[key] for key in summary["config"]["xconv"]} == summary["config"]["xconv"]
    assert summary["relu"] in ("bit", "exact") and summary["contraction"] == "auto"
    assert summary["metric_name"] == metric_name and summary["metric_mode"] == "max"  # accuracy, mIoU
    assert summary["metric"] == summary["metrics"][metric_name] and 0 <= summary["metric"] <= 1
    assert other_metrics <= set(summary["metrics"])
    assert summary["steps"] == steps
    assert summary["train_time_s"] > 0 and summary["samples_per_s"] > 0
    assert summary["device"] == "cpu" and summary["peak_memory_bytes"] is None
    assert summary["activation_bytes_exact"] > 0
    assert summary["git_commit"] is None or len(summary["git_commit"]) == 40


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("probes, relu", [(0, "exact"), (8, "bit")])
def test_two_step_run_writes_summary(task, probes, relu, tmp_path):
    overrides = TASKS[task][0]
    cfg = compose_config(*overrides, "xconv=default", f"xconv.probes={probes}", f"xconv.relu={relu}", output_dir=tmp_path)
    returned = run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    check_summary(summary, task, probes, steps=2)
    assert summary["checkpointing"] is None and summary["checkpointed_modules"] == 0
    if probes == 0:  # exact gradients with torch ReLUs keep exactly what plain torch keeps
        assert summary["activation_bytes"] == summary["activation_bytes_exact"]
    else:
        assert summary["activation_bytes"] < summary["activation_bytes_exact"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("task", config_names("task"))
def test_debug_tiny_runs_every_task_in_seconds(task, tmp_path):
    """``debug=tiny`` with a task's small data sizes (``TINY``): two training steps, scored by the config's metric."""
    fid_cache = [f"task.fid_cache_dir={tmp_path / 'fid'}"] if task == "gan" else []
    cfg = compose_config(*TINY[task], *fid_cache, output_dir=tmp_path)
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    assert summary["steps"] == 2 and summary["device"] == "cpu"  # the GAN's one batch: a D and a G step
    assert (summary["metric_name"], summary["metric_mode"]) == (cfg.task.metric.name, cfg.task.metric.mode)
    assert math.isfinite(summary["metric"])
    assert seconds < 30, f"{task}: {seconds:.1f} s"  # about 2 s at most on 2 shared CPU cores


def test_the_configs_metric_is_the_summarys_and_reloads_with_the_task(tmp_path):
    cfg = compose_config(*TINY_CLASSIFICATION, "task.metric.name=val/loss", "task.metric.mode=min", output_dir=tmp_path)
    summary = run(cfg)
    assert (summary["metric_name"], summary["metric_mode"]) == ("val/loss", "min")
    assert summary["metric"] == summary["metrics"]["val/loss"]
    reloaded = ClassificationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (reloaded.metric_name, reloaded.metric_mode) == ("val/loss", "min")
    built_in_python = ClassificationTask(reloaded.net, num_classes=10, optimizer=partial(torch.optim.Adam))  # no metric
    assert (built_in_python.metric_name, built_in_python.metric_mode) == ("val/acc", "max")


def test_run_without_validation_batches_has_no_headline_metric(tmp_path):
    cfg = compose_config(*TINY_CLASSIFICATION, "trainer.limit_val_batches=0", output_dir=tmp_path)
    summary = run(cfg)
    assert summary["metric_name"] == "val/acc" and summary["metric"] is None
    assert {"test/acc", "test/loss"} <= set(summary["metrics"]) and not any(k.startswith("val/") for k in summary["metrics"])
    assert json.loads((tmp_path / "summary.json").read_text())["metric"] is None


@pytest.mark.parametrize("max_time", ["00:00:00:00", "{seconds:0}", "{_target_:datetime.timedelta,seconds:0}"])
def test_trainer_max_time_stops_training(max_time, tmp_path):
    """The run's own Timer (for train_time_s) takes trainer.max_time: Lightning ignores a Trainer's
    max_time where a Timer callback is given. At zero, training stops when fit starts (Timer's first check)."""
    assert run(compose_config(*TINY_CLASSIFICATION, output_dir=tmp_path / "free"))["steps"] == 2
    assert run(compose_config(*TINY_CLASSIFICATION, f"+trainer.max_time={max_time}", output_dir=tmp_path / "timed"))["steps"] == 0


def test_plain_torch_out_of_memory_after_training_still_writes_the_summary(tmp_path, monkeypatch, caplog):
    """On a GPU, plain torch at a batch matched to half its bytes (equal_memory) may not fit: the run
    has trained, so its summary is written with activation_bytes_exact None, not lost."""
    measure = summary_module.saved_tensor_bytes

    def plain_torch_out_of_memory(fn, *args, net, **kwargs):
        if not any(isinstance(m, xconv.XConv2d) for m in net.modules()):
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return measure(fn, *args, net=net, **kwargs)

    monkeypatch.setattr(summary_module, "saved_tensor_bytes", plain_torch_out_of_memory)
    with caplog.at_level(logging.WARNING, logger="experiments.summary"):
        summary = run(compose_config(*TINY_SEGMENTATION, "xconv=sr4", output_dir=tmp_path))
    assert summary["activation_bytes_exact"] is None and summary["activation_bytes"] > 0 and summary["metric"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["activation_bytes_exact"] is None
    assert "plain torch's activations at the trained batch size do not fit cpu" in caplog.text


def test_checkpointing_run_records_its_segments_against_an_unwrapped_baseline(tmp_path):
    plain_torch = [*TINY_SEGMENTATION, "xconv.probes=0", "xconv.relu=exact"]
    cfg = compose_config(*plain_torch, "checkpointing=[encoder.layer*,decoder.blocks.*]", output_dir=tmp_path)
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    check_summary(summary, "segmentation", 0, steps=2)
    assert summary["checkpointing"] == ["encoder.layer*", "decoder.blocks.*"]
    assert summary["checkpointed_modules"] == 4 + 5
    assert summary["activation_bytes"] < 0.5 * summary["activation_bytes_exact"]
    # The baseline is the unwrapped network's, as a run without checkpointing measures it.
    datamodule, task, _ = build(compose_config(*plain_torch, output_dir=tmp_path / "plain"))
    datamodule.setup("fit")
    memory = activation_memory(task, next(iter(datamodule.train_dataloader())), torch.device("cpu"))
    assert memory["activation_bytes"] == memory["activation_bytes_exact"] == summary["activation_bytes_exact"]


# 16 scenes in batches of 4 make 4 steps an epoch; a step checkpoint every 2 steps.
INTERRUPTIBLE = [
    *TINY_SEGMENTATION, "data.train_scenes=16", "trainer.max_steps=4", "callbacks.step_checkpoint.every_n_train_steps=2",
]


def run_crashing_in_step_3(output_dir, monkeypatch) -> None:
    """A run of INTERRUPTIBLE that crashes in step 3, mid-epoch, as a Ctrl-C or a killed job would stop it."""
    training_step = SegmentationTask.training_step

    def crash_in_step_3(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("crash")
        return training_step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(SegmentationTask, "training_step", crash_in_step_3)
        with pytest.raises(RuntimeError, match="crash"):
            run(compose_config(*INTERRUPTIBLE, output_dir=output_dir))


def test_interrupted_run_resumes_from_its_last_step_checkpoint(tmp_path, monkeypatch):
    run_crashing_in_step_3(tmp_path / "first", monkeypatch)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["global_step"] == 2

    resumed = run(compose_config(*INTERRUPTIBLE, f"ckpt_path={last}", output_dir=tmp_path / "resumed"))
    assert resumed["steps"] == 4
    # Both throughput and training time cover the first run and the resumption.
    callbacks = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert callbacks["TrainThroughput"]["samples"] == 4 * 4
    assert resumed["samples_per_s"] == pytest.approx(4 * 4 / callbacks["TrainThroughput"]["step_time_s"])
    assert resumed["train_time_s"] > first["callbacks"]["Timer"]["time_elapsed"]["train"]


def test_resuming_with_other_xconv_settings_says_which(tmp_path, monkeypatch, caplog):
    """A resumed run converts its network as its own config says; where that differs from the checkpoint's
    run (e.g. a task whose default changed since), one warning names each setting, old and new."""
    run_crashing_in_step_3(tmp_path / "first", monkeypatch)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="experiments.build"):
        run(compose_config(*INTERRUPTIBLE, f"ckpt_path={last}", output_dir=tmp_path / "same"))
        assert not [r for r in caplog.records if r.name == "experiments.build"]
        summary = run(compose_config(*INTERRUPTIBLE, "xconv=sr4", f"ckpt_path={last}", output_dir=tmp_path / "sr4"))
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "experiments.build"]
    assert warning.startswith(f"ckpt_path: this run goes on with other XConv settings than the run that saved '{last}': ")
    assert "xconv.storage 'sketch' -> 'quantized'" in warning and "xconv.bits None -> 4" in warning
    assert summary["storage"] == "quantized" and summary["steps"] == 4


def test_a_new_run_into_an_interrupted_run_s_dir_is_refused_naming_output_dir(tmp_path, monkeypatch):
    run_crashing_in_step_3(tmp_path, monkeypatch)
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    with pytest.raises(ConfigError, match=rf"^output_dir: '{tmp_path}' holds an earlier run \(checkpoints\), which a new "
                                          rf"run would overwrite: resume it with ckpt_path={last}, or give another output_dir$"):
        run(compose_config(*INTERRUPTIBLE, output_dir=tmp_path))
    assert last.read_bytes() == saved


def csv_rows(path) -> list[dict]:
    """The rows of a CSV log, each without its empty cells (a later header may add columns)."""
    with open(path, newline="") as f:
        return [{key: value for key, value in row.items() if value} for row in csv.DictReader(f)]


def test_resuming_into_the_same_run_dir_keeps_the_csv_rows_logged_before(tmp_path, monkeypatch):
    run_crashing_in_step_3(tmp_path, monkeypatch)
    before = csv_rows(tmp_path / "csv" / "metrics.csv")
    assert {row["step"] for row in before if "train/loss" in row} == {"0", "1"}
    run(compose_config(*INTERRUPTIBLE, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", output_dir=tmp_path))
    after = csv_rows(tmp_path / "csv" / "metrics.csv")
    assert after[:len(before)] == before  # the rows of the interrupted run, as they were
    assert [row["step"] for row in after if "train/loss" in row] == ["0", "1", "2", "3"]
    assert any("summary/metric" in row for row in after)


def test_unreadable_checkpoint_is_a_config_error_naming_ckpt_path(tmp_path):
    saved = tmp_path / "saved.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(1000)}, "global_step": 2}, saved)
    cases = {
        "random.ckpt": bytes(range(256)) * 16,  # bytes that are no torch file
        "truncated.ckpt": saved.read_bytes()[:2000],  # a checkpoint cut off, as by a full disk or a killed copy
        "empty.ckpt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"^ckpt_path: cannot load .*{name}"):
            build(compose_config(*TINY_SEGMENTATION, f"ckpt_path={tmp_path / name}", output_dir=tmp_path / "run"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "weights.pt")  # a bare state_dict: no Lightning checkpoint
    with pytest.raises(ConfigError, match=r"^ckpt_path: .*weights\.pt.* is no Lightning checkpoint"):
        build(compose_config(*TINY_SEGMENTATION, f"ckpt_path={tmp_path / 'weights.pt'}", output_dir=tmp_path / "run"))


def test_checkpoint_of_another_model_or_task_is_a_config_error_naming_ckpt_path(tmp_path):
    def checkpoint_of(name: str, *overrides: str) -> Path:
        """A Lightning-style checkpoint of the task ``overrides`` build, as its run would save it."""
        _, task, _ = build(compose_config(*overrides, output_dir=tmp_path / name))
        torch.save({"state_dict": task.state_dict(), "global_step": 2}, tmp_path / f"{name}.ckpt")
        return tmp_path / f"{name}.ckpt"

    small_cnn = checkpoint_of("small_cnn", *TINY_CLASSIFICATION)
    segmentation = checkpoint_of("segmentation", *TINY_SEGMENTATION)
    build(compose_config(*TINY_CLASSIFICATION, f"ckpt_path={small_cnn}", output_dir=tmp_path / "run"))  # its own: fits
    for overrides, checkpoint, reason in [
        ([*TINY_CLASSIFICATION, "model=resnet18_cifar"], small_cnn, r"\d+ keys missing, e\.g\. net\.conv1\.weight"),
        (TINY_CLASSIFICATION, segmentation, r"\d+ keys missing, .*; \d+ unexpected keys, e\.g\. net\.encoder\."),
        ([*TINY_CLASSIFICATION, "model.channels=[8,32,32]"], small_cnn,
         r"\?\): 3 of another shape, e\.g\. net\.features\.0\.weight \(16x1x3x3 in the checkpoint, 8x1x3x3 here\)"),
    ]:
        with pytest.raises(ConfigError, match=rf"^ckpt_path: '.*{checkpoint.name}' does not fit the task's network .*{reason}"):
            build(compose_config(*overrides, f"ckpt_path={checkpoint}", output_dir=tmp_path / "run"))


@pytest.mark.parametrize("case", [
    "random ckpt_path", "ckpt_path of another model", "run dir in /proc", "run dir under a file", "output_dir in /proc",
])
def test_unreadable_checkpoint_or_run_dir_exits_2_with_one_line_and_leaves_nothing(case, tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 16)
    torch.save({"state_dict": {"net.weight": torch.zeros(3)}, "global_step": 2}, tmp_path / "other.ckpt")
    (tmp_path / "file").write_text("not a directory")
    # As Hydra's default outputs/<task>/<time>: the parents the run creates go too.
    run_dir, extra = tmp_path / "outputs" / "segmentation" / "run", []
    if "ckpt_path" in case:  # the other model's is refused after xconv.convert, whose log line is held back
        extra, key = [f"ckpt_path={tmp_path / ('garbage.ckpt' if 'random' in case else 'other.ckpt')}"], "ckpt_path"
    elif case == "output_dir in /proc":  # output_dir, normally Hydra's run directory, set apart from it
        extra, key = ["output_dir=/proc/xconv-forbidden/x"], "output_dir"
    else:
        run_dir, key = (Path("/proc/xconv-forbidden/x") if "proc" in case else tmp_path / "file" / "run"), "hydra.run.dir"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *TINY_SEGMENTATION, *extra, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), lines
    assert not run_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "garbage.ckpt", "other.ckpt"]  # nothing else written


def test_multirun_over_probes_writes_one_summary_per_job(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "-m", *TINY_SEGMENTATION, "xconv.probes=0,8",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("LeafSpec", "💡 Tip", "logging interval"):  # warnings a user can do nothing about
        assert noise not in result.stdout + result.stderr
    for job, probes in enumerate([0, 8]):
        summary = json.loads((tmp_path / f"{job}_probes{probes}" / "summary.json").read_text())
        check_summary(summary, "segmentation", probes, steps=2)
        assert math.isfinite(summary["metric"])


def test_classification_tests_on_the_held_out_split(tmp_path):
    cfg = compose_config(*TINY_CLASSIFICATION, "trainer.limit_test_batches=2", output_dir=tmp_path)
    datamodule, task, trainer = build(cfg)
    metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    assert set(metrics) == {"test/acc", "test/loss"} and 0 <= metrics["test/acc"] <= 1


def test_importing_the_framework_changes_no_global_state():
    """No resolver, config schema, warning filter or log filter is installed by importing run.py and
    experiments/: run.py (before Hydra composes), build() and main do that, when a run starts."""
    code = """
import logging, warnings
import hydra, lightning, torch, torchvision, torchmetrics, segmentation_models_pytorch, wandb
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
filters = list(warnings.filters)
handlers = {name: list(logging.getLogger(name).filters) for name in ("lightning.pytorch.utilities.rank_zero", "xconv")}
import run, experiments.build, experiments.tasks, experiments.data, experiments.models, experiments.cli
import experiments.registry
assert "xconv_schema.yaml" not in ConfigStore.instance().repo, "config schema stored"
assert warnings.filters == filters, "warning filters added"
assert not OmegaConf.has_resolver("sweep_dir"), "resolver registered"
assert handlers == {name: list(logging.getLogger(name).filters) for name in handlers}, "log filters added"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
