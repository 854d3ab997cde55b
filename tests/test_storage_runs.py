"""Low-bit storage and the budget planner from the config, on every task's network."""
from __future__ import annotations

import pytest
import torch
from hydra_helpers import TINY, TINY_SEGMENTATION, compose_config

from experiments.errors import ConfigError
from experiments.summary import activation_memory
from xconv.lightning import XConvCallback
from run import build, run

STORAGE = ["xconv.batchnorm_bits=4", "xconv.maxpool=true"]


@pytest.mark.parametrize("task", sorted(TINY))
def test_planned_network_keeps_its_budget(task, tmp_path):
    extra = [f"task.fid_cache_dir={tmp_path}"] if task == "gan" else []
    cfg = compose_config(*TINY[task], *STORAGE, "xconv.budget=0.5", *extra, output_dir=tmp_path)
    datamodule, net_task, trainer = build(cfg)
    plan = next(cb for cb in trainer.callbacks if isinstance(cb, XConvCallback)).storage_plan
    assert plan.layers and plan.total_bytes <= 0.5 * plan.plain_bytes
    # What the run summary measures, on another batch of the same shapes.
    memory = activation_memory(net_task, next(iter(datamodule.train_dataloader())), torch.device("cpu"))
    assert memory["activation_bytes"] <= 0.5 * memory["activation_bytes_exact"]


@pytest.mark.parametrize("task", ["segmentation", "superres"])
def test_quantized_storage_keeps_under_a_third(task, tmp_path):
    """SR storage of convs and BatchNorms at 4 bits keeps under a third of plain torch's bytes (about a
    quarter on these tiny maps, where the loss's own saved tensors weigh more than on real ones)."""
    cfg = compose_config(*TINY[task], *STORAGE, "xconv.storage=quantized", "xconv.bits=4", output_dir=tmp_path)
    datamodule, net_task, _ = build(cfg)
    datamodule.setup("fit")
    memory = activation_memory(net_task, next(iter(datamodule.train_dataloader())), torch.device("cpu"))
    assert memory["activation_bytes"] < memory["activation_bytes_exact"] / 3


@pytest.mark.parametrize("override, message", [
    ("xconv.budget=1.5", "xconv.budget must be None or a fraction in (0, 1]"),
    ("xconv.budget=0.01", "xconv.budget: "),
    ("xconv.bits=3", "xconv.bits must be one of"),
    ("xconv.batchnorm_bits=5", "xconv.batchnorm_bits must be one of"),
])
def test_bad_storage_options_fail_before_training(override, message, tmp_path):
    """Values the schema's types let through; bad types and choices fail earlier, when the config is
    composed (tests/test_config.py)."""
    cfg = compose_config(*TINY_SEGMENTATION, override, output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        build(cfg)
    assert "\n" not in str(err.value)


def test_plan25_option_is_the_planner_at_a_quarter_and_trains(tmp_path):
    """``xconv=plan25`` (what ``make run`` uses) is the byte-budget planner at 0.25x of plain torch's
    bytes with SR 4-bit BatchNorms and offset max-pools; the plan fits its budget and trains."""
    preset = compose_config(*TINY_SEGMENTATION, "xconv=plan25", output_dir=tmp_path)
    explicit = compose_config(*TINY_SEGMENTATION, "xconv.batchnorm_bits=4", "xconv.maxpool=true", "xconv.budget=0.25",
                              output_dir=tmp_path)
    assert preset.xconv == explicit.xconv
    summary = run(preset)
    plan = summary["storage_plan"]
    assert summary["steps"] == 2 and summary["budget"] == 0.25
    assert plan["total_bytes"] <= plan["budget_bytes"] == pytest.approx(0.25 * plan["plain_bytes"], rel=1e-3)


def test_sr4_option_is_the_explicit_storage_settings_and_trains(tmp_path):
    """``xconv=sr4`` is SR 4-bit storage of convs and BatchNorms with offset
    max-pools, the rest of ``xconv`` as the default; it converts every conv and BatchNorm and trains."""
    preset = compose_config(*TINY_SEGMENTATION, "xconv=sr4", output_dir=tmp_path)
    explicit = compose_config(*TINY_SEGMENTATION, *STORAGE, "xconv.storage=quantized", "xconv.bits=4",
                              output_dir=tmp_path)
    assert preset.xconv == explicit.xconv
    summary = run(preset)
    assert summary["steps"] == 2 and summary["storage"] == "quantized" and summary["bits"] == 4
    assert summary["activation_bytes"] < summary["activation_bytes_exact"] / 3
