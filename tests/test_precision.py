"""Mixed precision through Lightning (``+trainer.precision=bf16-mixed``) with XConv layers, end to end."""
from __future__ import annotations

import json
import math

import pytest
from hydra_helpers import TINY_CLASSIFICATION, TINY_IMAGE, TINY_SEGMENTATION, compose_config

from run import run

TINY = {"segmentation": TINY_SEGMENTATION, "classification": TINY_CLASSIFICATION, "superres": ["task=superres", *TINY_IMAGE]}


@pytest.mark.parametrize("task", sorted(TINY))
def test_bf16_mixed_run_trains_and_measures_bf16_activations(task, tmp_path):
    summaries = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = compose_config(*TINY[task], "xconv=default", "xconv.probes=8", f"+trainer.precision={precision}",
                             output_dir=tmp_path / precision)
        run(cfg)
        summaries[precision] = json.loads((tmp_path / precision / "summary.json").read_text())
    fp32, bf16 = summaries["32-true"], summaries["bf16-mixed"]
    assert bf16["precision"] == "bf16-mixed" and fp32["precision"] == "32-true"
    assert bf16["steps"] == 2 and math.isfinite(bf16["metric"])
    # Autocast halves what the convs and the sketches keep; normalisation layers and losses
    # stay fp32, and the 1-bit masks are dtype-free: somewhat more than half is left.
    for key in ("activation_bytes", "activation_bytes_exact"):
        assert 0.4 * fp32[key] < bf16[key] < 0.8 * fp32[key], (key, bf16[key], fp32[key])


@pytest.mark.parametrize("precision, dtype_bytes", [("64-true", 8), ("bf16-true", 2)])
def test_true_precisions_train_and_measure_in_their_dtype(precision, dtype_bytes, tmp_path):
    # The summary measures activations on a batch converted as Lightning converts it for training.
    cfg = compose_config(*TINY_CLASSIFICATION, "xconv=default", "xconv.probes=8", f"+trainer.precision={precision}", output_dir=tmp_path)
    summary = run(cfg)
    assert summary["precision"] == precision and math.isfinite(summary["metric"])
    fp32 = run(compose_config(*TINY_CLASSIFICATION, "xconv=default", "xconv.probes=8", output_dir=tmp_path / "fp32"))
    # The max-pools' int64 indices keep their size; everything else scales with the dtype.
    ratio = summary["activation_bytes_exact"] / fp32["activation_bytes_exact"]
    assert (ratio > 1.5) if dtype_bytes == 8 else (ratio < 0.75), ratio
