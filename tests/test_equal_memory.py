"""The equal-memory protocol: each run trains at the batch whose activation bytes come nearest one budget."""
from __future__ import annotations

import json

import pytest
import torch
from hydra_helpers import TINY_CLASSIFICATION, TINY_IMAGE, TINY_SEGMENTATION, compose_config

import xconv
from experiments.equal_memory import match_batch_size, nearest_batch
from experiments.errors import ConfigError
from experiments.summary import activation_memory
from run import build, run


def _counted(fn):
    calls = []

    def measure(batch):
        calls.append(batch)
        return fn(batch)
    return measure, calls


@pytest.mark.parametrize("per_sample, fixed, budget", [
    (1000, 0, 8000), (1000, 0, 8499), (1000, 0, 8501), (1000, 37, 8000), (733, 5000, 50_000), (1000, 0, 100),
    (10, 0, 10**6),
])
@pytest.mark.parametrize("start", [1, 16, 200])
def test_nearest_batch_is_the_nearest_of_every_batch_in_a_few_measurements(per_sample, fixed, budget, start):
    limit = 500
    measure, calls = _counted(lambda b: fixed + per_sample * b)
    batch, measured = nearest_batch(measure, budget, start, limit)
    best = min(range(1, limit + 1), key=lambda b: (abs(fixed + per_sample * b - budget), b))
    assert (batch, measured) == (best, fixed + per_sample * best)
    assert len(set(calls)) <= 5


def test_nearest_batch_follows_measurements_that_are_not_a_line():
    # e.g. storage rounded up to whole groups: steps instead of a line
    bytes_at = lambda b: 4096 * -(-b * 300 // 4096)  # noqa: E731
    batch, _ = nearest_batch(bytes_at, 20_000, 16, 200)
    assert batch == min(range(1, 201), key=lambda b: (abs(bytes_at(b) - 20_000), b))


@pytest.mark.parametrize("start", [2, 3, 4, 9])
def test_nearest_batch_never_measures_below_the_smallest(start):
    """A batch of one sample cannot be measured on a network with BatchNorm and 1x1 maps: not tried."""
    def measure(batch):
        assert batch >= 2, "measured a batch of one"
        return 1000 * batch
    assert nearest_batch(measure, 100, start, 50, smallest=2) == (2, 2000)
    assert nearest_batch(measure, 7400, start, 50, smallest=2) == (7, 7000)
    assert nearest_batch(measure, 10**6, start, start, smallest=2) == (start, 1000 * start)


def test_nearest_batch_refuses_what_it_cannot_search():
    with pytest.raises(ValueError, match="budget >= 1"):
        nearest_batch(lambda b: b, 0, 1, 10)
    with pytest.raises(ValueError, match="start <= limit"):
        nearest_batch(lambda b: b, 5, 11, 10)


@pytest.mark.parametrize("xconv_options, fraction", [
    (["xconv=exact"], 0.5), (["xconv=sr4"], 1.0), (["xconv=default"], 0.5), (["xconv=plan25"], 0.5),
])
def test_the_matched_batch_s_bytes_are_nearest_the_budget(xconv_options, fraction, tmp_path):
    """On a small model (the digits at 16x16, the small CNN): the chosen batch's measured bytes are within 5%
    of the budget and nearer to it than those of the batches beside it; the generators are untouched."""
    cfg = compose_config(*TINY_CLASSIFICATION, *xconv_options, "data.batch_size=32", output_dir=tmp_path)
    datamodule, task, _ = build(cfg)
    state, count = torch.get_rng_state(), xconv.rng.draw_count()
    record = match_batch_size(task, datamodule, fraction, 32)
    assert torch.equal(torch.get_rng_state(), state) and xconv.rng.draw_count() == count
    assert datamodule.batch_size == record.batch_size

    def bytes_at(batch_size, key="activation_bytes"):
        datamodule.batch_size = batch_size
        return activation_memory(task, next(iter(datamodule.train_dataloader())), torch.device("cpu"))[key]

    assert record.budget_bytes == int(fraction * bytes_at(32, "activation_bytes_exact"))
    assert record.activation_bytes == bytes_at(record.batch_size)
    assert abs(record.activation_bytes / record.budget_bytes - 1) <= 0.05
    for other in (record.batch_size - 1, record.batch_size + 1):
        assert abs(bytes_at(other) - record.budget_bytes) >= abs(record.activation_bytes - record.budget_bytes)
    if xconv_options == ["xconv=exact"]:
        assert record.batch_size == 16  # exact at half the bytes is exact at half batch
    else:
        assert record.batch_size > 32 * fraction


def test_a_run_trains_at_the_matched_batch_and_records_it(tmp_path):
    cfg = compose_config(*TINY_SEGMENTATION, "xconv=sr4", "data.train_scenes=32", "equal_memory={fraction:0.5,batch_size:4}",
                         output_dir=tmp_path)
    summary = run(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    record = summary["equal_memory"]
    assert record["fraction"] == 0.5 and record["reference_batch_size"] == 4
    assert summary["batch_size"] == record["batch_size"] > 2 and cfg.data.batch_size == 4
    # The summary measures on a batch of the size trained with: the bytes the matching found.
    assert summary["activation_bytes"] == record["activation_bytes"]
    assert record["ratio_to_budget"] == record["activation_bytes"] / record["budget_bytes"]


def test_a_mixed_precision_run_is_matched_by_the_bytes_it_trains_with(tmp_path):
    cfg = compose_config(*TINY_CLASSIFICATION, "xconv=sr4", "+trainer.precision=bf16-mixed",
                         "equal_memory={fraction:1.0,batch_size:8}", output_dir=tmp_path)
    summary = run(cfg)
    assert summary["precision"] == "bf16-mixed"
    assert summary["activation_bytes"] == summary["equal_memory"]["activation_bytes"]


def test_a_reference_batch_of_two_on_a_network_with_batchnorm(tmp_path):
    """The U-Net's 1x1 bottleneck cannot run BatchNorm on one sample: the matching never tries one."""
    cfg = compose_config(*TINY_SEGMENTATION, "data.batch_size=2", "equal_memory={fraction:1.0,batch_size:2}",
                         output_dir=tmp_path)
    assert run(cfg)["batch_size"] >= 2


def test_a_budget_no_batch_comes_near_is_warned_about(tmp_path, caplog):
    cfg = compose_config(*TINY_CLASSIFICATION, "equal_memory={fraction:0.01,batch_size:8}", output_dir=tmp_path)
    with caplog.at_level("WARNING", logger="experiments.equal_memory"):
        datamodule, _, _ = build(cfg)
    assert datamodule.batch_size == 2
    assert any("equal_memory: batch 2 keeps" in r.getMessage() for r in caplog.records)


def test_without_the_protocol_the_summary_says_so(tmp_path):
    summary = run(compose_config(*TINY_CLASSIFICATION, output_dir=tmp_path))
    assert summary["equal_memory"] is None and summary["batch_size"] == 4


@pytest.mark.parametrize("overrides, message", [
    (["equal_memory={fraction:2,batch_size:4}"], r"^equal_memory\.fraction must be a number in \(0, 1\], got 2$"),
    (["equal_memory={fraction:0.5,batch_size:0}"], r"^equal_memory\.batch_size must be an int >= 1, got 0$"),
    (["equal_memory={fraction:0.5}"], r"^equal_memory must be null or \{fraction: F, batch_size: B\}, got \{'fraction': 0\.5\}$"),
    (["equal_memory={fraction:0.5,batch_size:100000}"], r"^equal_memory\.batch_size must be at most the training set's \d+ samples"),
])
def test_bad_equal_memory_values_are_refused_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(compose_config(*TINY_CLASSIFICATION, *overrides, output_dir=tmp_path))


def test_a_data_module_without_a_batch_size_is_refused(tmp_path):
    cfg = compose_config("task=superres", *TINY_IMAGE, "equal_memory={fraction:0.5,batch_size:1}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^equal_memory: \w+ has no batch_size to choose$"):
        build(cfg)
