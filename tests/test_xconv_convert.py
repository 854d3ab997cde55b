"""xconv.convert / set_probes / revert on real architectures."""
from __future__ import annotations

import copy

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

import xconv
from xconv.nn import _XConvMixin


def _models():
    yield "resnet18", torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)
    yield "unet", smp.Unet("resnet18", encoder_weights=None, classes=3), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name, model, x", list(_models()), ids=["resnet18", "unet"])
def test_convert_keeps_state_dict_parameters_and_outputs(name, model, x):
    model.train()
    params_before = {k: id(p) for k, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    converted = xconv.convert(model, probes=8)
    assert converted is model and model.training
    assert {k: id(p) for k, p in model.named_parameters()} == params_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    n_convs = sum(isinstance(m, _XConvMixin) for m in model.modules())
    assert n_convs > 0 and not any(type(m) in (nn.Conv2d, nn.ReLU) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)
    model.train()
    xconv.revert(model)
    assert not any(isinstance(m, (_XConvMixin, xconv.BitReLU)) for m in model.modules())
    assert {k: id(p) for k, p in model.named_parameters()} == params_before


def test_converted_training_step_matches_exact_where_exact():
    """Input-side quantities stay exact: the loss and every bias gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    ref = nn.Sequential(*[m for m in model])  # same modules, converted below
    x = torch.randn(2, 3, 16, 16)
    loss_ref = ref(x).square().mean()
    loss_ref.backward()
    bias_grads = [m.bias.grad.clone() for m in ref if isinstance(m, nn.Conv2d)]
    model.zero_grad()
    xconv.convert(model, probes=4)
    loss = model(x).square().mean()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    for got, expected in zip([m.bias.grad for m in model if isinstance(m, _XConvMixin)], bias_grads):
        torch.testing.assert_close(got, expected)


class WeightStandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_subclass_overriding_forward_is_skipped_loudly():
    model = nn.Sequential(WeightStandardizedConv(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"0 \(WeightStandardizedConv\)"):
        xconv.convert(model)
    assert type(model[0]) is WeightStandardizedConv and isinstance(model[1], xconv.XConv2d)


def test_include_exclude_relu_flag_and_set_probes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.LeakyReLU(0.1))
    xconv.convert(model, probes=4, relu=False, exclude=["2"])
    assert isinstance(model[0], xconv.XConv2d) and type(model[2]) is nn.Conv2d
    assert type(model[1]) is nn.ReLU
    xconv.convert(model, probes=4, include=["1", "3"])
    assert type(model[1]) is xconv.BitReLU and type(model[3]) is xconv.BitLeakyReLU
    assert model[3].negative_slope == 0.1
    xconv.set_probes(model, 0)
    assert model[0].probes == 0
    xconv.convert(model, probes=2, mode="orthogonal")  # converting again updates the options
    assert model[0].probes == 2 and model[0].sketch_config.mode == "orthogonal"


def test_include_that_selects_nothing_raises_before_replacing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"include: no conv or ReLU matches \['conv\*'\]; the model's convs: 0"):
        xconv.convert(model, include="conv*")
    with pytest.raises(ValueError, match=r"include: no conv matches \['1'\]"):
        xconv.convert(model, include="1", relu=False)
    with pytest.raises(ValueError, match=r"exclude: no module matches \['head'\]; the model's convs: 0"):
        xconv.convert(model, exclude=["0", "head"])
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.ReLU


def test_convert_transposed_and_a_bare_conv():
    layer = xconv.convert(nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1), probes=2, mode="orthogonal")
    assert isinstance(layer, xconv.XConvTranspose2d) and layer.sketch_config.mode == "orthogonal"


def test_convert_rejects_bad_options_before_touching_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        xconv.convert(model, mode="fast")
    assert type(model[0]) is nn.Conv2d


def test_include_exclude_accept_one_pattern_as_a_string():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    xconv.convert(model, include="0", relu=False)
    assert isinstance(model[0], xconv.XConv2d) and type(model[1]) is nn.Conv2d
    xconv.convert(model, exclude="0", relu=False)
    assert isinstance(model[1], xconv.XConv2d)


def test_set_probes_validates_even_without_xconv_layers():
    with pytest.raises(ValueError, match="probes must be >= 0"):
        xconv.set_probes(nn.Sequential(nn.Conv2d(3, 4, 3)), -1)


def test_batchnorm_and_maxpool_storage_convert_and_revert():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=5)
    model = xconv.convert(copy.deepcopy(plain), storage="quantized", bits=8, batchnorm_bits=4, maxpool=True)
    assert isinstance(model.bn1, xconv.XBatchNorm2d) and model.bn1.bits == 4
    assert isinstance(model.maxpool, xconv.XMaxPool2d)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(plain, mode)()
        assert torch.equal(model(x.requires_grad_()), plain(x))
    for key, value in plain.state_dict().items():  # running statistics updated alike
        assert torch.equal(model.state_dict()[key], value), key
    xconv.convert(model, batchnorm_bits=None, maxpool=False)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.maxpool) is nn.MaxPool2d
    xconv.convert(model, batchnorm_bits=8, maxpool=True)
    xconv.revert(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    assert not hasattr(model.bn1, "bits")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batchnorm_bits=3), "batchnorm_bits must be one of None, 2, 4, 8, 16"),
    (dict(maxpool="yes"), "maxpool must be a bool"),
])
def test_bad_batchnorm_and_maxpool_options(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        xconv.convert(nn.Sequential(nn.Conv2d(1, 1, 1)), **kwargs)
