"""xconv.lightning.XConvCallback: XConv in a user's own LightningModule, and converted tasks that reload."""
from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from hydra_helpers import TINY_SEGMENTATION, compose_config
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import xconv
from experiments.tasks import SegmentationTask
from run import build
from xconv.lightning import CHECKPOINT_KEY, XConvCallback
from xconv.nn import _XConvMixin


class TinyRegression(L.LightningModule):
    """What a user writes: a small CNN, its loss, its optimizer; nothing about XConv."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_load_checkpoint(self, checkpoint):
        XConvCallback.restore(self, checkpoint)


def _trainer(tmp_path, callbacks) -> L.Trainer:
    return L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 2, 12, 12, generator=generator), torch.randn(8, 1, 12, 12, generator=generator))
    return DataLoader(data, batch_size=4)


def test_own_lightning_module_gains_xconv_through_the_callback_alone(tmp_path):
    module = TinyRegression()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(tmp_path, [XConvCallback(probes=4, modules="net")])
    trainer.fit(module, _loader())
    layers = [m for m in module.net if isinstance(m, _XConvMixin)]
    assert [type(m) for m in module.net] == [xconv.XConv2d, xconv.BitReLU, xconv.XConv2d]
    assert all(m.probes == 4 for m in layers)
    assert trainer.global_step == 2
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))  # it trained
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    checkpoint = torch.load(tmp_path / "own.ckpt", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["options"] == xconv.ConvertOptions(probes=4).to_dict()

    reloaded = TinyRegression.load_from_checkpoint(tmp_path / "own.ckpt")
    assert [type(m) for m in reloaded.net] == [type(m) for m in module.net]
    x = torch.randn(3, 2, 12, 12)
    torch.testing.assert_close(reloaded.net.eval()(x), module.net.eval()(x), rtol=0, atol=0)


def test_callback_applies_once_and_names_missing_modules(tmp_path):
    module = TinyRegression()
    callback = XConvCallback(modules=["net"], probes=4)
    callback.apply(module)
    first = module.net[0]
    callback.apply(module)  # setup after an early apply: nothing changes
    assert module.net[0] is first
    with pytest.raises(ValueError, match=r"^modules: \['backbone'\] are not submodules of TinyRegression"):
        XConvCallback(modules="backbone").apply(TinyRegression())
    with pytest.raises(ValueError, match=r"^budget must be None or a fraction in \(0, 1\]"):
        XConvCallback(budget=2.0)
    with pytest.raises(TypeError, match=r"^prbes: no such option; the options of xconv.convert: probes, mode"):
        XConvCallback(prbes=4)


class _Loaders(L.LightningDataModule):
    def train_dataloader(self):
        return _loader()


@pytest.mark.parametrize("kwargs, datamodule, message", [
    (dict(modules=["net.0", "net.2"]), _Loaders(),
     r"^budget: plans one network; give modules=\[one name\], got \['net.0', 'net.2'\]"),
    (dict(modules="net"), None, r"^budget: plans on the datamodule's first training batch; fit with a datamodule"),
    (dict(modules="net"), _Loaders(), r"^budget: needs loss=loss\(net, batch\), or a method loss\(batch, net=...\) on TinyRegression"),
])
def test_a_budget_says_what_it_lacks_before_anything_is_converted(kwargs, datamodule, message):
    module = TinyRegression()
    with pytest.raises(ValueError, match=message):
        XConvCallback(budget=0.5, **kwargs).apply(module, datamodule)
    assert [type(m) for m in module.net] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    with pytest.raises(TypeError, match=r"^loss must be None or a function loss\(net, batch\), got 3"):
        XConvCallback(budget=0.5, loss=3)


def test_a_named_module_that_is_itself_a_conv_is_replaced():
    module = TinyRegression()
    XConvCallback(modules=["net.0", "net.1"], probes=4).apply(module)
    assert [type(m) for m in module.net] == [xconv.XConv2d, xconv.BitReLU, nn.Conv2d]
    assert module.net[0].probes == 4


def test_trained_converted_task_reloads_with_its_layers_and_options(tmp_path):
    """A run with a storage plan, SR BatchNorms and offset max-pools: ``load_from_checkpoint`` alone
    (no network passed) rebuilds the network with every layer's class and options, and the same
    eval outputs."""
    overrides = [*TINY_SEGMENTATION, "xconv.budget=0.5", "xconv.batchnorm_bits=4", "xconv.maxpool=true"]
    datamodule, trained, trainer = build(compose_config(*overrides, output_dir=tmp_path))
    trainer.fit(trained, datamodule=datamodule)
    reloaded = SegmentationTask.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    options = {n: (type(m), m.sketch_config, m.min_pixels) for n, m in trained.net.named_modules()
               if isinstance(m, _XConvMixin)}
    assert options == {n: (type(m), m.sketch_config, m.min_pixels) for n, m in reloaded.net.named_modules()
                       if isinstance(m, _XConvMixin)}
    # The plan made every layer's storage its own: not what convert alone gives.
    assert len({cfg for _, cfg, _ in options.values()}) > 1
    assert [type(m) for m in reloaded.net.modules()] == [type(m) for m in trained.net.modules()]
    kinds = {type(m).__name__ for m in reloaded.net.modules()}
    assert {"XBatchNorm2d", "XMaxPool2d", "BitReLU"} <= kinds and "BatchNorm2d" not in kinds
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.net.eval()(x), trained.net.eval()(x), rtol=0, atol=0)
    path = tmp_path / "checkpoints" / "last.ckpt"
    plain = SegmentationTask.load_from_checkpoint(path)
    xconv.revert(plain.net)  # the same weights in torch's layers: the conversion changes nothing in eval
    torch.testing.assert_close(reloaded.net(x), plain.net.eval()(x), rtol=0, atol=0)


def test_import_xconv_does_not_import_lightning():
    code = "import sys, xconv; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
