"""XMaxPool against torch's MaxPool on fresh random inputs: identical outputs and input gradients,
only packed window offsets kept for backward, torch's forward where offsets do not apply."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xconv.memory import saved_tensor_bytes
from xconv.pooling import MAXPOOL_CLASSES, XMaxPool2d

# (id, torch class, constructor kwargs, input shape, bits per offset)
GEOMETRIES = [
    ("1d-k2", nn.MaxPool1d, dict(kernel_size=2), (2, 3, 10), 2),
    ("1d-k4-p2-d2-ceil", nn.MaxPool1d, dict(kernel_size=4, stride=1, padding=2, dilation=2, ceil_mode=True),
     (2, 3, 11), 2),
    ("1d-unbatched-k5-s2", nn.MaxPool1d, dict(kernel_size=5, stride=2, padding=2), (3, 13), 4),
    ("2d-k3-s2-p1-resnet", nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1), (2, 3, 9, 10), 4),
    ("2d-k3-s1-p1", nn.MaxPool2d, dict(kernel_size=3, stride=1, padding=1), (2, 3, 7, 7), 4),
    ("2d-k2-s2-unet", nn.MaxPool2d, dict(kernel_size=2), (2, 3, 8, 8), 2),
    ("2d-k3-s2-ceil", nn.MaxPool2d, dict(kernel_size=3, stride=2, ceil_mode=True), (2, 3, 8, 9), 4),
    ("2d-k2x3-d2x1-ceil", nn.MaxPool2d, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True),
     (2, 3, 8, 9), 4),
    ("2d-unbatched-k3-s2-p1", nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1), (3, 9, 9), 4),
    ("2d-k16-s1", nn.MaxPool2d, dict(kernel_size=(2, 8), stride=1, padding=(1, 4)), (2, 2, 6, 12), 4),
    ("2d-k5-s1-p2", nn.MaxPool2d, dict(kernel_size=5, stride=1, padding=2), (2, 2, 7, 7), 8),
    ("3d-k3-s2-p1", nn.MaxPool3d, dict(kernel_size=3, stride=2, padding=1), (2, 2, 5, 7, 6), 8),
    ("3d-k2x3x3-s121-ceil", nn.MaxPool3d, dict(kernel_size=(2, 3, 3), stride=(1, 2, 1), padding=1, ceil_mode=True),
     (2, 2, 4, 7, 6), 8),
    ("3d-k2", nn.MaxPool3d, dict(kernel_size=2), (2, 3, 4, 4, 4), 4),
    ("3d-unbatched-k2-d2", nn.MaxPool3d, dict(kernel_size=2, stride=1, dilation=2), (2, 5, 5, 5), 4),
]
IDS = [g[0] for g in GEOMETRIES]


def fresh_input(shape, channels_last=False, dtype=torch.float32):
    # Half-integer values: many ties, so the argmax choice (first maximum) is exercised.
    x = (torch.randn(shape) * 2).round().to(dtype) / 2
    if channels_last:  # channels innermost: torch's channels_last for 4-d and 5-d inputs
        order = (0, *range(2, x.dim()), 1)
        x = x.permute(order).contiguous().permute(sorted(range(x.dim()), key=order.__getitem__))
    return x.requires_grad_()


def run(layer, x, grad_y):
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, grad_y)
    return y, gx


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-innermost"])
def test_output_and_input_grad_identical_to_torch(geometry, channels_last):
    _, base, kwargs, shape, _ = geometry
    if channels_last and len(shape) != int(base.__name__[-2]) + 2:
        pytest.skip("channels innermost needs a batched input")
    ref, layer = base(**kwargs), MAXPOOL_CLASSES[base](**kwargs)
    x = fresh_input(shape, channels_last)
    grad_y = torch.randn_like(ref(x))
    y_ref, gx_ref = run(ref, x, grad_y)
    y, gx = run(layer, x, grad_y)
    assert layer.uses_offsets(x)
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    assert torch.equal(gx, gx_ref) and gx.stride() == gx_ref.stride()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    ref, layer = nn.MaxPool2d(3, 2, 1), XMaxPool2d(3, 2, 1)
    x = fresh_input((2, 3, 9, 9), dtype=dtype)
    grad_y = torch.randn_like(ref(x))
    assert all(torch.equal(a, b) for a, b in zip(run(ref, x, grad_y), run(layer, x, grad_y)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_strided_input_gradient_has_torch_s_layout(channels_last):
    ref, layer = nn.MaxPool2d(3, 2, 1), XMaxPool2d(3, 2, 1)
    x = fresh_input((2, 3, 8, 16), channels_last).detach()[..., ::2].requires_grad_()
    grad_y = torch.randn_like(ref(x))
    (_, gx_ref), (_, gx) = run(ref, x, grad_y), run(layer, x, grad_y)
    assert torch.equal(gx, gx_ref) and gx.stride() == gx_ref.stride()


def test_overlapping_windows_sum_in_torch_s_order():
    """One element is the argmax of 9 stride-1 windows; their fp32 gradient sum depends on the
    order of the adds (1 first absorbs the eight 2^-24; last, it does not): it must be torch's."""
    ref, layer = nn.MaxPool2d(3, 1, 1), XMaxPool2d(3, 1, 1)
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1
    x.requires_grad_()
    grad_y = torch.randn(1, 1, 9, 9)
    grad_y[0, 0, 3:6, 3:6] = 2.0**-24
    grad_y[0, 0, 3, 3] = 1
    window = grad_y[0, 0, 3:6, 3:6].reshape(-1)
    assert sum(window.unbind()) != sum(window.flip(0).unbind())  # fp32 adds in the two orders
    gx_ref, gx = run(ref, x, grad_y)[1], run(layer, x, grad_y)[1]
    assert torch.equal(gx, gx_ref)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_saved_bytes_are_the_packed_offsets(geometry):
    _, base, kwargs, shape, bits = geometry
    ref, layer = base(**kwargs), MAXPOOL_CLASSES[base](**kwargs)
    x = fresh_input(shape)
    outputs = ref(x).numel()
    assert saved_tensor_bytes(lambda: ref(x)).total_bytes == x.numel() * 4 + outputs * 8
    per_byte = 8 // bits
    assert saved_tensor_bytes(lambda: layer(x)).total_bytes == -(-outputs // per_byte)


def test_torch_forward_where_offsets_do_not_apply():
    x = fresh_input((2, 3, 18, 18))
    layer = XMaxPool2d(3, 2, 1)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.MaxPool2d(3, 2, 1)(x))
    assert layer(x.detach()).grad_fn is None
    y, index = XMaxPool2d(3, 2, 1, return_indices=True)(x)
    y_ref, index_ref = nn.MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert torch.equal(y, y_ref) and torch.equal(index, index_ref)
    big = XMaxPool2d(17, 1)  # 289 window positions: more than 8 bits
    assert not big.uses_offsets(x)
    assert type(big(x).grad_fn).__name__ != "XMaxPoolFunctionBackward"


def test_double_backward_raises_naming_the_layer():
    x = fresh_input((1, 2, 6, 6))
    with pytest.raises(RuntimeError, match="XMaxPool2d does not support double backward"):
        torch.autograd.grad(XMaxPool2d(2)(x).pow(2).sum(), x, create_graph=True)


def test_same_repr_and_state_as_torch():
    for base, cls in MAXPOOL_CLASSES.items():
        ref, layer = base(3, stride=2, padding=1, ceil_mode=True), cls(3, stride=2, padding=1, ceil_mode=True)
        assert isinstance(layer, base)
        assert repr(layer) == repr(ref).replace(base.__name__, cls.__name__)
        assert layer.state_dict() == ref.state_dict() == {}
