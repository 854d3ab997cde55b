"""task=gan: DCGAN pair, FID features (Inception or a cached classifier), two-step runs, conversion of one part."""
from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from hydra_helpers import TINY_GAN, compose_config
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from test_run import SUMMARY_FIELDS
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

import xconv
from experiments.tasks import fid
from experiments.errors import ConfigError
from experiments.data import DigitsDataModule
from experiments.models import dcgan
from experiments.tasks import GANTask
from run import build, run

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One feature-classifier cache for the runs of this module, so the classifier trains once."""
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def digits():
    datamodule = DigitsDataModule(image_size=16)
    datamodule.setup()
    return datamodule


def gan_config(*overrides, cache_dir, output_dir):
    return compose_config(*TINY_GAN, f"task.fid_cache_dir={cache_dir}", *overrides, output_dir=output_dir)


def test_config_composes_and_the_generator_follows_the_data_channels(tmp_path):
    cfg = compose_config("task=gan", output_dir=tmp_path)
    assert cfg.task._target_ == "experiments.tasks.GANTask" and cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.task.fid_feature == "auto" and cfg.data.image_size == 32
    for data, channels in [("digits", 1), ("cifar10", 3)]:
        net = instantiate(compose_config("task=gan", f"data={data}", output_dir=tmp_path).model)
        images = net["generator"](torch.randn(2, net["generator"].latent_dim))
        assert images.shape == (2, channels, 32, 32)
    assert compose_config("task=gan", "data=mnist", output_dir=tmp_path).data.image_size == 32  # 28 resized


@pytest.mark.parametrize("probes, relu, logger", [(0, "exact", "csv"), (8, "bit", "wandb")])
def test_two_step_run_writes_summary_with_fid_and_samples(probes, relu, logger, cache_dir, tmp_path, monkeypatch):
    logged = []
    if logger == "wandb":
        monkeypatch.setenv("WANDB_MODE", "disabled")
        monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, step=None: logged.append((key, images)))
    cfg = compose_config(*TINY_GAN, f"logger={logger}", f"task.fid_cache_dir={cache_dir}", "xconv=default", f"xconv.probes={probes}",
                         f"xconv.relu={relu}", output_dir=tmp_path)
    returned = run(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads(json.dumps(returned))
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["task"] == "gan" and summary["probes"] == probes
    assert summary["metric_name"] == "val/fid" and summary["metric"] == summary["metrics"]["val/fid"]
    assert summary["metric_mode"] == "min"  # FID: lower is better
    assert math.isfinite(summary["metric"]) and summary["metric"] > 0  # an untrained generator is no digit writer
    assert summary["metrics"]["fid_feature"] == "classifier"
    assert summary["steps"] == 2  # one batch: one discriminator and one generator step
    if probes == 0:  # exact gradients with torch ReLUs keep exactly what plain torch keeps
        assert summary["activation_bytes"] == summary["activation_bytes_exact"]
    else:
        assert summary["activation_bytes"] < summary["activation_bytes_exact"]
    grid = tmp_path / "samples" / "step000002.png"
    assert Image.open(grid).size == (8 * (16 + 2) + 2,) * 2  # 8x8 samples of 16x16, 2-pixel borders
    assert logged == ([("val/samples", [str(grid)])] if logger == "wandb" else [])


def test_one_training_step_updates_generator_and_discriminator(cache_dir, tmp_path):
    datamodule, task, trainer = build(gan_config(cache_dir=cache_dir, output_dir=tmp_path))
    before = {name: p.detach().clone() for name, p in task.net.named_parameters()}
    trainer.fit(task, datamodule=datamodule)
    for part in ("generator", "discriminator"):
        changed = [not torch.equal(before[name], p) for name, p in task.net.named_parameters() if name.startswith(part)]
        assert all(changed), part


@pytest.mark.parametrize("part", ["generator", "discriminator"])
def test_include_converts_only_the_chosen_part(part, cache_dir, tmp_path):
    _, task, _ = build(gan_config(f"xconv.include=[{part}.*]", cache_dir=cache_dir, output_dir=tmp_path))
    xconv_layers = (xconv.XConv2d, xconv.XConvTranspose2d, xconv.BitReLU, xconv.BitLeakyReLU)
    for name, module in task.net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU, nn.LeakyReLU)):
            assert isinstance(module, xconv_layers) == name.startswith(part), name
    transposed = [m for m in task.net.modules() if isinstance(m, xconv.XConvTranspose2d)]
    assert len(transposed) == (3 if part == "generator" else 0)  # 1x1 -> 4x4 -> 8x8 -> 16x16


def test_feature_classifier_is_trained_once_then_loaded(digits, tmp_path, monkeypatch):
    trained = []
    train = fid.train_feature_classifier
    monkeypatch.setattr(fid, "train_feature_classifier", lambda *args: trained.append(args) or train(*args))
    rng = torch.random.get_rng_state()
    first = fid.cached_feature_classifier(digits, tmp_path, steps=20)
    # Trained under its own seed: the caller's random stream is untouched, trained or loaded.
    assert torch.equal(torch.random.get_rng_state(), rng)
    second = fid.cached_feature_classifier(digits, tmp_path, steps=20)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert len(trained) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["fid_classifier_DigitsDataModule_1x16x16_n1257_seed0_steps20_v1.pt"]
    images = digits.val_set.tensors[0][:8]
    assert torch.equal(first(images), second(images)) and first(images).shape == (8, fid.CLASSIFIER_FEATURES)
    fid.cached_feature_classifier(digits, tmp_path, steps=21)  # other training: another file
    assert len(trained) == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_crash_while_caching_leaves_no_file(digits, tmp_path, monkeypatch):
    def crash(obj, path):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fid.cached_feature_classifier(digits, tmp_path, steps=2)
    assert list(tmp_path.iterdir()) == []


def test_classifier_fid_is_zero_between_equal_sets_and_largest_for_noise(digits, cache_dir):
    features = fid.cached_feature_classifier(digits, cache_dir, steps=100)

    def distance(real, fake):
        metric = FrechetInceptionDistance(features)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return metric.compute().item()

    val = digits.val_set.tensors[0]
    noise = distance(val, torch.rand_like(val))
    assert abs(distance(val, val)) < 1e-6 * noise
    assert distance(val, digits.train_set.tensors[0][: len(val)]) < noise / 10  # other digits: near


def test_auto_uses_inception_when_it_loads_and_the_classifier_otherwise(digits, tmp_path, monkeypatch):
    class FakeInception(nn.Module):
        num_features = 2

        def forward(self, images):
            return images.flatten(1)[:, :2]

    monkeypatch.setattr(fid, "InceptionFeatures", FakeInception)
    metric, kind = fid.fid_metric("auto", digits, tmp_path, classifier_steps=5)
    assert kind == "inception" and isinstance(metric.inception, FakeInception)
    assert list(tmp_path.iterdir()) == []  # no classifier trained

    def unavailable():
        raise ModuleNotFoundError("no torch-fidelity")

    monkeypatch.setattr(fid, "InceptionFeatures", unavailable)
    metric, kind = fid.fid_metric("auto", digits, tmp_path, classifier_steps=5)
    assert kind == "classifier" and isinstance(metric.inception, fid.ClassifierFeatures)
    with pytest.raises(ConfigError, match=r"^task\.fid_feature: 'inception' cannot be loaded \(no torch-fidelity\)"):
        fid.fid_metric("inception", digits, tmp_path, classifier_steps=5)


def test_inception_features_get_three_channel_bytes(monkeypatch):
    seen = []

    def network(name, features_list):
        return lambda images: seen.append(images) or torch.zeros(len(images), 2048)

    monkeypatch.setattr("torchmetrics.image.fid.NoTrainInceptionV3", network)
    grey = torch.tensor([0.0, 0.5, 1.0, 0.2]).reshape(1, 1, 2, 2)
    assert fid.InceptionFeatures()(grey).shape == (1, 2048)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 2, 2)
    assert seen[0][0, 2].flatten().tolist() == [0, 128, 255, 51]


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.fid_feature=fancy", r"task\.fid_feature: must be one of \['auto', 'classifier', 'inception'\], got"),
        ("task.fid_classifier_steps=0", r"task\.fid_classifier_steps: must be an int >= 1, got 0"),
        ("data.image_size=28", r"image_size: DCGAN needs a power of two >= 8 .*, got 28"),
        ("model.latent_dim=0", r"latent_dim: must be an int >= 1, got 0"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_argument(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build(gan_config(override, cache_dir=tmp_path, output_dir=tmp_path))


def test_task_needs_a_generator_discriminator_pair():
    adam = partial(torch.optim.Adam, lr=1e-3)
    missing = r"^net: needs an nn.ModuleDict with 'generator' and 'discriminator', missing \['discriminator'\]"
    with pytest.raises(ValueError, match=missing):
        GANTask(nn.ModuleDict({"generator": dcgan(image_size=8)["generator"]}), adam)
    with pytest.raises(ValueError, match="^net: needs"):
        GANTask(nn.Linear(2, 2), adam)
    with pytest.raises(ValueError, match="^fid_feature: must be one of"):
        GANTask(dcgan(image_size=8), adam, fid_feature="Inception")
