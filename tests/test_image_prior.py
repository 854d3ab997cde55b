"""Deep image prior: super-resolution and inpainting (experiments/tasks/image_prior.py and its data and network)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import skimage.data
import torch
from hydra.utils import instantiate
from hydra_helpers import TINY_IMAGE, compose_config
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio
from test_run import SUMMARY_FIELDS

import xconv
from experiments.errors import ConfigError
from experiments.data.single_image import (
    InpaintingDataModule,
    SuperResolutionDataModule,
    random_mask,
    text_mask,
)
from experiments.degradations import downsample
from experiments.models import SkipNet
from experiments.tasks import InpaintingTask, SuperResolutionTask
from run import build, run

OTHER_METRICS = {
    "superres": {
        "val/ssim", "val/psnr_best", "val/ssim_best", "val/best_step", "val/psnr_baseline", "val/ssim_baseline",
    },
    "inpainting": {"val/ssim", "val/psnr_best", "val/psnr_baseline", "val/psnr_mean_fill", "val/ssim_mean_fill"},
}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 or float in [0, 1] -> [1, 3, H, W] float32 in [0, 1]."""
    image = image / 255 if image.dtype == np.uint8 else image
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("task", ["superres", "inpainting"])
@pytest.mark.parametrize("probes, relu", [(0, "exact"), (8, "bit")])
def test_two_step_run_writes_summary_and_images(task, probes, relu, tmp_path):
    cfg = compose_config(f"task={task}", *TINY_IMAGE, "xconv=default", f"xconv.probes={probes}", f"xconv.relu={relu}",
                         output_dir=tmp_path)
    run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["task"] == task and summary["probes"] == probes and summary["steps"] == 2
    assert summary["metric_name"] == "val/psnr" and summary["metric"] == summary["metrics"]["val/psnr"]
    assert OTHER_METRICS[task] <= set(summary["metrics"])
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    # One validation after the one epoch of 2 steps and one after fit, at the same weights.
    assert summary["metrics"]["val/psnr_best"] == summary["metric"] and summary["metrics"]["val/best_step"] == 2
    assert summary["device"] == "cpu" and summary["train_time_s"] > 0 and summary["samples_per_s"] > 0
    if probes == 0:  # exact gradients and torch LeakyReLUs keep what plain torch keeps
        assert summary["activation_bytes"] == summary["activation_bytes_exact"]
    else:
        assert summary["activation_bytes"] < summary["activation_bytes_exact"]
    names = {"clean", "observed", "baseline", "final", "best"} | ({"mean_fill"} if task == "inpainting" else set())
    assert {p.stem for p in (tmp_path / "images").glob("*.png")} == names
    with Image.open(tmp_path / "images" / "observed.png") as observed:
        assert observed.size == ((8, 8) if task == "superres" else (32, 32))


def test_best_is_the_highest_psnr_of_any_validation(tmp_path):
    # A validation after each of 4 steps, then the one after fit.
    cfg = compose_config("task=inpainting", *TINY_IMAGE, "data.steps_per_epoch=1", "trainer.max_steps=4",
                         "xconv=default", "xconv.probes=0", output_dir=tmp_path)
    summary = run(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["val/psnr"]]
    psnrs = [float(row["val/psnr"]) for row in rows]
    assert len(psnrs) == 5 and len(set(psnrs[:4])) == 4  # the network changes at every step
    best = max(range(4), key=psnrs.__getitem__)
    assert summary["metrics"]["val/psnr_best"] == pytest.approx(psnrs[best])
    assert summary["metrics"]["val/best_step"] == int(rows[best]["step"]) + 1
    assert summary["metrics"]["val/ssim_best"] == pytest.approx(float(rows[best]["val/ssim"]))


def test_downsample_is_pils_bicubic_and_the_baseline_its_bicubic_upscale():
    clean = skimage.data.astronaut()[200:248, 180:228]  # 48x48
    image = to_tensor(clean)
    for scale in (2, 4, 8):
        small = downsample(image, scale)
        reference = [Image.fromarray(image[0, c].numpy(), mode="F").resize((48 // scale,) * 2, Image.BICUBIC)
                     for c in range(3)]
        torch.testing.assert_close(small[0], torch.from_numpy(np.stack(reference)), atol=1e-5, rtol=0)
    task = SuperResolutionTask(SkipNet(4, channels=[4]), torch.optim.Adam, scale=4)
    low = downsample(image, 4).clamp(0, 1)
    upscaled = task.baselines({"observed": low, "noise": torch.zeros(1, 4, 48, 48)})["baseline"]
    reference = [Image.fromarray(low[0, c].numpy(), mode="F").resize((48, 48), Image.BICUBIC) for c in range(3)]
    torch.testing.assert_close(upscaled[0], torch.from_numpy(np.stack(reference)).clamp(0, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale"):
        downsample(image[..., :47], 4)


def test_superres_psnr_is_on_the_luma_with_a_border_of_scale_pixels_cropped():
    clean = skimage.data.astronaut()[100:164, 200:264] / 255
    # Noise that is larger near the border, so a wrong border crop changes the PSNR.
    noise = np.random.default_rng(0).normal(0, 0.03, clean.shape)
    noise[:4], noise[-4:], noise[:, :4], noise[:, -4:] = (5 * noise[:4], 5 * noise[-4:], 5 * noise[:, :4],
                                                          5 * noise[:, -4:])
    output = np.clip(clean + noise, 0, 1)
    s = 4
    luma = rgb2ycbcr(clean)[s:-s, s:-s, 0], rgb2ycbcr(output)[s:-s, s:-s, 0]
    reference = peak_signal_noise_ratio(*luma, data_range=255)
    task = SuperResolutionTask(SkipNet(4, channels=[4]), torch.optim.Adam, scale=s)
    task.val_metrics.update(task.metric_view(to_tensor(output)), task.metric_view(to_tensor(clean)))
    assert task.val_metrics.compute()["val/psnr"].item() == pytest.approx(reference, abs=1e-3)
    assert task.metric_view(to_tensor(clean)).shape == (1, 1, 56, 56)
    task.val_metrics.reset()
    task.val_metrics.update(to_tensor(clean), to_tensor(clean))
    scores = task.val_metrics.compute()
    assert scores["val/psnr"].item() == math.inf and scores["val/ssim"].item() == pytest.approx(1)


@pytest.mark.parametrize("hole_size, size, tolerance", [(1, (40, 56), 0), (4, (40, 56), 0), (5, (37, 41), 0.05)])
def test_random_mask_has_the_requested_hole_fraction_and_follows_the_seed(hole_size, size, tolerance):
    masks = [random_mask(*size, 0.3, hole_size, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert masks[0].shape == (1, *size) and set(masks[0].unique().tolist()) == {0.0, 1.0}
    assert 1 - masks[0].mean().item() == pytest.approx(0.3, abs=tolerance + 1e-6)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    with pytest.raises(ValueError, match="hole_fraction"):
        random_mask(*size, 1.0)


def test_text_mask_writes_text_over_the_image():
    mask = text_mask(96, 128, "deep image prior", font_size=12)
    holes = 1 - mask[0]
    assert mask.shape == (1, 96, 128) and 0.05 < holes.mean() < 0.3
    rows_with_text = holes.sum(dim=1) > 0
    assert rows_with_text[:12].any() and rows_with_text[-24:].any()  # top to bottom
    assert (holes.sum(dim=0) > 0).float().mean() > 0.8  # left to right


def test_inpainting_observation_is_the_masked_image_from_a_mask_file(tmp_path):
    known = np.full((512, 512), 255, dtype=np.uint8)
    known[200:300, 100:400] = 0  # a dark band: the hole
    Image.fromarray(known).save(tmp_path / "mask.png")
    dm = InpaintingDataModule("astronaut", mask="file", mask_file=str(tmp_path / "mask.png"), resize=128, crop=96)
    sample = dm.val_sample
    expected = torch.ones(96, 96)
    expected[34:59, 9:84] = 0  # rows 200:300, cols 100:400 at 1/4 scale, less the 16 pixels cropped off each side
    assert torch.equal(sample["mask"][0], expected)
    torch.testing.assert_close(sample["observed"], sample["clean"] * expected)
    assert "clean" not in dm.train_sample  # the fit never sees the ground truth


@pytest.mark.parametrize("scale", [4, 8])
def test_superres_image_is_trimmed_to_a_multiple_of_the_scale(scale):
    dm = SuperResolutionDataModule("coffee", scale=scale, resize=60)  # 400x600 -> 60x90
    height, width = 60 - 60 % scale, 90 - 90 % scale
    assert dm.clean.shape == (3, height, width) and dm.train_sample["noise"].shape == (32, height, width)
    assert dm.train_sample["observed"].shape == (3, height // scale, width // scale)


def test_folder_image_is_read_by_name_or_stem(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "baby.png")
    for image in ("baby", "baby.png"):
        dm = SuperResolutionDataModule(image, root=str(tmp_path), scale=4)
        torch.testing.assert_close(dm.clean[None], to_tensor(pixels))
        assert dm.train_sample["observed"].shape == (3, 10, 12)


@pytest.mark.parametrize(
    "task, override, error",
    [
        ("superres", "data.image=lena", "data.image: must be one of scikit-image's .*'astronaut'"),
        ("superres", "data.scale=5", r"data.scale: must be one of \[2, 3, 4, 8\], got 5"),
        ("superres", "data.crop=600", "data.crop: 600 exceeds"),
        ("superres", "data.root=/nonexistent/xconv-images", "data.root: no directory"),
        ("inpainting", "data.mask=blobs", r"data.mask: must be one of \['random', 'text', 'file'\]"),
        ("inpainting", "data.mask=file", "data.mask_file: mask=file needs a mask image"),
        ("inpainting", "data.mask=file data.mask_file=/nonexistent/mask.png", "data.mask_file: no file"),
        ("inpainting", "data.mask=random data.hole_fraction=1.5", "data.hole_fraction"),
        ("inpainting", "data.mask=random data.hole_fraction=abc", r"data.hole_fraction: must be a number in \[0, 1\), got 'abc'"),
        ("inpainting", "data.mask=random data.hole_size=2.5", "data.hole_size: must be an int >= 1, got 2.5"),
        ("superres", "data.scale=4.0", r"data.scale: must be one of \[2, 3, 4, 8\], got 4.0"),
        ("superres", "data.crop=0", "data.crop: must be an int >= 1, got 0"),
        ("superres", "data.resize=-5", "data.resize: must be an int >= 1, got -5"),
        ("superres", "data.input_channels=0", "data.input_channels: must be an int >= 1, got 0"),
        ("superres", "data.steps_per_epoch=2.5", "data.steps_per_epoch: must be an int >= 1, got 2.5"),
        ("superres", "data.noise_scale=0", "data.noise_scale: must be a number > 0, got 0"),
        ("inpainting", "data.mask_file=/tmp/mask.png", "data.mask_file: read only with mask=file, got mask='text'"),
        ("inpainting", "data=superres_image", "data: needs data of type InpaintingDataModule, got SuperResolutionDataModule"),
        ("superres", "data.crop=16 data.resize=16", "model.channels: 4 scales need an input of at least 17x17 pixels, got 16x16"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_key(task, override, error, tmp_path):
    with pytest.raises(ConfigError, match=error):
        build(compose_config(f"task={task}", "debug=tiny", *override.split(), output_dir=tmp_path))


def test_mask_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "mask.png").write_text("not an image")
    with pytest.raises(ValueError, match="mask_file: .*mask.png' is not an image file PIL can read"):
        InpaintingDataModule("astronaut", mask="file", mask_file=str(tmp_path / "mask.png"))


def test_image_missing_from_the_folder_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "bird.png")
    with pytest.raises(FileNotFoundError, match=r"image: no image file 'baby' .* holds \['bird'\]"):
        SuperResolutionDataModule("baby", root=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"channels": []}, "channels: need at least one scale"),
        ({"channels": [8, 8], "skip_channels": [4]}, "skip_channels: need one int >= 0 or 2"),
        ({"kernel_size": 4}, "kernel_size: must be odd"),
        ({"upsample": "area"}, r"upsample: must be one of \['bilinear', 'nearest', 'bicubic'\]"),
    ],
)
def test_skip_net_rejects_bad_arguments_by_name(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SkipNet(**kwargs)


def test_skip_net_any_size_every_conv_and_leaky_relu_converted():
    net = SkipNet(in_channels=8, channels=[16, 16, 16], skip_channels=[4, 0, 2])
    assert net(torch.rand(1, 8, 37, 50)).shape == (1, 3, 37, 50)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    xconv.convert(net, probes=8)
    assert sum(isinstance(m, xconv.XConv2d) for m in net.modules()) == convs
    assert not any(type(m) is torch.nn.LeakyReLU for m in net.modules())
    assert {m.padding_mode for m in net.modules() if isinstance(m, xconv.XConv2d) and m.kernel_size == (3, 3)} == {
        "reflect"}
    out = net(torch.rand(1, 8, 37, 50))
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("scales", [1, 3])
def test_skip_net_smallest_input_and_a_clear_error_below_it(scales):
    net = SkipNet(in_channels=2, channels=[4] * scales)
    size = 2**scales + 1  # the coarsest scale keeps 2x2 pixels
    assert net(torch.rand(1, 2, size, size + 3)).shape == (1, 3, size, size + 3)
    with pytest.raises(ValueError, match=f"{scales} scales need an input of at least {size}x{size} pixels"):
        net(torch.rand(1, 2, size + 3, size - 1))


@pytest.mark.parametrize("preset, iterations", [("paper_superres", 2000), ("paper_inpainting", 5000)])
def test_paper_presets_are_the_papers_protocol(preset, iterations, tmp_path):
    cfg = compose_config(f"experiment={preset}", output_dir=tmp_path)
    assert list(cfg.model.channels) == [128] * 5 and cfg.model.upsample == "bilinear"
    assert cfg.data.resize is None and cfg.data.crop is None  # full-size images
    assert cfg.data.steps_per_epoch * cfg.trainer.max_epochs == iterations
    assert isinstance(instantiate(cfg.task), (SuperResolutionTask, InpaintingTask))
