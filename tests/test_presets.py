"""The reproduction presets (configs/experiment/paper_*): every CPU variant trains offline, the GPU ones build."""
from __future__ import annotations

import json

import pytest
import torch
from hydra_helpers import compose_config, config_names
from test_data import write_folder

from run import build, run

CPU_PRESETS = [name for name in config_names("experiment") if name.endswith("_cpu")]
# Smaller data where a preset's own would take long to build in a test.
SMALL_DATA = {
    "paper_segmentation_cpu": ["data.train_scenes=8", "data.val_scenes=4", "data.batch_size=4"],
    # The equal-memory presets measure a few batch sizes first: small ones here.
    "equal_memory_segmentation_cpu": ["data.train_scenes=16", "data.val_scenes=4", "data.batch_size=4",
                                      "equal_memory.batch_size=4"],
    "equal_memory_classification_cpu": ["data.image_size=16", "data.batch_size=4", "equal_memory.batch_size=4"],
}


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_preset_trains_offline(preset, tmp_path):
    cfg = compose_config(f"experiment={preset}", "debug=tiny", *SMALL_DATA.get(preset, []), output_dir=tmp_path)
    summary = run(cfg)
    assert summary["steps"] == 2 and summary["metric"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["task_name"] == cfg.task_name


def test_every_paper_preset_has_a_cpu_variant():
    papers = {name for name in config_names("experiment") if name.startswith("paper_")}
    assert papers and all(f"{name}_cpu" in papers for name in papers if not name.endswith("_cpu"))


def test_paper_mnist_table_is_the_papers_protocol(tmp_path):
    cfg = compose_config("experiment=paper_mnist_table", output_dir=tmp_path)
    assert cfg.data._target_.endswith("MNISTDataModule") and cfg.model._target_.endswith("SmallCNN")
    assert list(cfg.model.channels) == [16, 32, 32] and cfg.model.image_size == 28
    assert cfg.task.optimizer.lr == 3e-3


def test_paper_segmentation_runs_on_a_folder_with_a_test_split(tmp_path):
    write_folder(tmp_path / "train", 6)
    write_folder(tmp_path / "test", 2)
    cfg = compose_config(
        "experiment=paper_segmentation", f"data.root={tmp_path / 'train'}", f"data.test_root={tmp_path / 'test'}",
        "data.image_size=64", "data.batch_size=2", "data.num_workers=0", "debug=tiny", "trainer.max_steps=-1",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", output_dir=tmp_path / "run",
    )
    datamodule, task, trainer = build(cfg)
    assert isinstance(task.configure_optimizers()["lr_scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    summary = run(cfg)
    assert summary["epochs"] == 2
    # Validation holds out 1 of the 6 training pairs; the 2 test pairs are scored after training.
    assert {"val/dice", "val/mIoU", "test/dice", "test/mIoU", "test/IoU/gland"} <= set(summary["metrics"])
