"""xconv.convert on third-party architectures built without weights (torchvision, timm,
segmentation-models-pytorch): the converted model computes what the torch model computes, trains,
and the share of saved-for-backward bytes it keeps is reported (not asserted) after the tests."""
from __future__ import annotations

import copy
import functools

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from torch import nn

import xconv
from xconv.memory import saved_tensor_bytes
from xconv._layer import _XConvMixin
from xconv.nn import XCONV_CLASSES

tv = torchvision.models


def _image(size: int) -> tuple[int, ...]:
    return 2, 3, size, size


def _smp(arch: str, size: int = 64):
    return functools.partial(getattr(smp, arch), "resnet18", encoder_weights=None, classes=2), _image(size)


def _timm(name: str):
    return functools.partial(timm.create_model, name, pretrained=False, num_classes=10), _image(32)


# name -> (builder, input shape [B, C, (T,) H, W]); inputs are as small as each model allows.
CASES = {
    "tv-resnet18": (lambda: tv.resnet18(num_classes=10), _image(32)),
    "tv-mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), _image(32)),
    "tv-mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), _image(32)),
    "tv-mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), _image(32)),
    "tv-efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), _image(32)),
    "tv-shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), _image(32)),
    "tv-squeezenet1_0": (lambda: tv.squeezenet1_0(num_classes=10), _image(32)),
    "tv-googlenet": (lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=False), _image(32)),
    "tv-inception_v3": (lambda: tv.inception_v3(num_classes=10, aux_logits=False, init_weights=False), _image(75)),
    "tv-regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), _image(32)),
    "tv-densenet121": (lambda: tv.densenet121(num_classes=10), _image(32)),
    "tv-r3d_18": (lambda: tv.video.r3d_18(num_classes=10), (2, 3, 4, 32, 32)),
    "smp-UnetPlusPlus": _smp("UnetPlusPlus"),
    "smp-FPN": _smp("FPN"),
    "smp-DeepLabV3": _smp("DeepLabV3"),  # output stride 8: dilation and padding set on built convs
    "smp-DeepLabV3Plus": _smp("DeepLabV3Plus"),
    "smp-PSPNet": _smp("PSPNet"),
    "smp-Linknet": _smp("Linknet"),
    "smp-MAnet": _smp("MAnet"),
    "smp-PAN": _smp("PAN", 128),  # its pyramid pools the 1/16 map three more times
    "timm-resnet18": _timm("resnet18"),
    "timm-efficientnet_b0": _timm("efficientnet_b0"),
    "timm-convnext_atto": _timm("convnext_atto"),
}

# Input and parameter gradients match to float rounding, not bit for bit: each XConv layer
# computes its input gradient by a convolution_backward call for the input alone, for which
# torch's CPU backend may pick another kernel than for the joint input+weight call the torch
# layer makes (measured: up to 8e-7 of the layer's largest entry on 64-channel 32x32 maps, 3-d
# convs included). Carried through the network it reached 5e-6 of a gradient's largest entry
# (smp MAnet; r3d_18, Inception-v3, Unet++ and PAN 4e-7 to 3e-6; the others bit for bit).
# Gradients that are zero up to cancellation (the bias of a conv followed by BatchNorm) are
# rounding noise sized by the terms summed, not by the result: FLOOR, a fraction of the model's
# largest parameter gradient, covers them (measured: 2.7e-7 of it, the bias of smp Linknet's
# transposed conv before a BatchNorm, where xconv sums the output gradient and torch's layer takes
# oneDNN's sum: xconv's is 8e-5 from the float64 sum, torch's 5.5e-4).
RELATIVE, FLOOR = 1e-4, 1e-6


def _pair(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(plain, converted, input)``: the model built under a fixed seed, a deep copy of it
    converted with ``xconv.convert``'s defaults, and a random input of the case's shape."""
    build, shape = CASES[name]
    torch.manual_seed(0)
    plain = build()
    model = xconv.convert(copy.deepcopy(plain))
    torch_convs = sum(isinstance(m, tuple(XCONV_CLASSES)) for m in plain.modules())
    assert sum(isinstance(m, _XConvMixin) for m in model.modules()) == torch_convs > 0
    assert model.state_dict().keys() == plain.state_dict().keys()
    return plain, model, torch.randn(shape)


def _forward(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input leaf, output)`` of one forward after ``torch.manual_seed(seed)`` (dropout masks)."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    return x, model(x)


def _loss(y: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is a fixed random tensor, drawn from a private generator so the
    global RNG stream that the models' dropout reads is left alone."""
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum()


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 0.0) -> None:
    atol = RELATIVE * want.abs().max().item() + floor
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("name", CASES)
def test_eval_forward_is_torch_s_and_input_gradient_to_rounding(name):
    """In eval mode, with grad mode on (the estimator runs), on the freshly built model: a train
    forward first would move the BatchNorm running statistics."""
    plain, model, x = _pair(name)
    plain.eval(), model.eval()
    (xp, yp), (xc, yc) = _forward(plain, x, 1), _forward(model, x, 1)
    assert torch.equal(yc, yp)
    _loss(yp).backward()
    _loss(yc).backward()
    _assert_close(xc.grad, xp.grad, "input gradient")


@pytest.mark.parametrize("name", CASES)
def test_train_forward_is_torch_s_and_gradients_to_rounding(name):
    """Train mode (batch statistics; dropout and stochastic depth under the same torch.manual_seed:
    XConv layers derive their seeds without moving the generator): the output bit for bit, the
    input gradient and every parameter gradient but the XConv weights' (estimates) to rounding."""
    plain, model, x = _pair(name)
    (xp, yp), (xc, yc) = _forward(plain, x, 1), _forward(model, x, 1)
    assert torch.equal(yc, yp)
    _loss(yp).backward()
    _loss(yc).backward()
    _assert_close(xc.grad, xp.grad, "input gradient")
    estimated = {id(m.weight) for m in model.modules() if isinstance(m, _XConvMixin)}
    largest = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
    for (key, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), key
        if q.grad is not None and id(p) not in estimated:
            _assert_close(p.grad, q.grad, f"gradient of {key}", floor=FLOOR * largest)


@pytest.mark.parametrize("name", CASES)
def test_training_step_is_finite_and_saved_bytes_are_reported(name, record_property):
    """Saved bytes of one train forward + loss, converted against torch (recorded; tests/conftest.py prints
    them as a table after the run); then one SGD step of the converted model: every parameter whose
    gradient in torch is above rounding (a conv bias before a BatchNorm has a true gradient of zero)
    gets a finite, non-zero one."""
    plain, model, x = _pair(name)
    reports = [saved_tensor_bytes(lambda: _loss(_forward(m, x, 1)[1]), model=m) for m in (plain, model)]
    ratio = reports[1].total_bytes / reports[0].total_bytes
    unconvertible = reports[1].bytes_by_status()["unconvertible"] / reports[1].total_bytes
    record_property("saved_bytes_ratio", ratio)
    record_property("unconvertible_share", unconvertible)

    _loss(_forward(plain, x, 2)[1]).backward()  # which parameters get a (non-zero) gradient at all
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _loss(_forward(model, x, 2)[1]).backward()
    largest = max(q.grad.abs().max().item() for q in plain.parameters() if q.grad is not None)
    for (key, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), key
            nonzero = q.grad.abs().max() > FLOOR * largest
            assert p.grad.any() or not nonzero, f"{key}: no gradient where torch's is above rounding"
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(_forward(model, x, 3)[1]).all()
