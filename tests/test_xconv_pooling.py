"""XMaxPool against torch's MaxPool on fresh random inputs: identical outputs and input gradients,
only packed window offsets kept for backward, torch's forward where offsets do not apply."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kernels import needs_kernels, torch_threads
from xconv import _native, pooling
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


# +-0 and +-1e-40 by their bits: a conversion from Python floats flushes denormals under torch.set_flush_denormal
ZEROS_AND_DENORMALS = torch.tensor([0, -(2**31), 0x116C2, -(2**31) + 0x116C2], dtype=torch.int32).view(torch.float32)


def random_pool_2d(generator):
    """A fresh 2-d pool geometry torch accepts (padding at most half the kernel) and an input ``[B, C, H, W]``
    (C > 1: with one channel the input is also channels-last) or ``[C, H, W]`` of whole and half
    numbers (ties), NaNs, infinities, zeros of both signs and denormals."""
    def draw(low, high):
        return int(torch.randint(low, high + 1, (), generator=generator))

    kernel, dilation = (draw(1, 4), draw(1, 4)), (draw(1, 2), draw(1, 2))
    padding = (draw(0, kernel[0] // 2), draw(0, kernel[1] // 2))
    stride = (draw(1, 3), draw(1, 3))
    size = [draw((k - 1) * d + 1, 40) for k, d in zip(kernel, dilation)]
    shape = [draw(1, 3), *size] if draw(0, 1) else [draw(1, 2), draw(2, 3), *size]
    x = (torch.randn(shape, generator=generator) * 2).round() / 2
    specials = torch.cat([torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")]), ZEROS_AND_DENORMALS])
    where = torch.randperm(x.numel(), generator=generator)[: x.numel() // 8]
    x.view(-1)[where] = specials[torch.randint(0, len(specials), where.shape, generator=generator)]
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=bool(draw(0, 1))), x.requires_grad_()


@needs_kernels
@pytest.mark.parametrize("flush_denormal", [False, True], ids=["denormals", "flush-denormal"])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_pool_computes_torch_s_bits(threads, flush_denormal, monkeypatch):
    """The C kernels (eager fp32 contiguous 2-d pools) give torch's output bits (the last NaN of a
    window, -inf where nothing beats it) and its input gradient (the winner of each window: the first
    maximum; sums in torch's order) for 60 fresh random geometries, strides 1-3 taking the vector
    path and the scalar one at the plane's edges, on 1 or 3 threads, in the calling thread's
    floating-point mode (denormals compare as zeros under ``torch.set_flush_denormal``: each geometry
    also pools an input of only zeros and denormals of both signs, whose winners then change). torch's
    reference runs on one thread: its OpenMP workers do not take the calling thread's mode."""
    assert _native.kernels() is not None, "xconv's C kernels did not build"
    monkeypatch.setattr(_native, "PARALLEL_MIN_ELEMENTS", 1)  # threads even for small inputs
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch_threads(threads):
        XMaxPool2d(2)(torch.zeros(4, 2, 4, 4, requires_grad=True))  # starts the pool's threads before the mode is set
    assert torch.set_flush_denormal(flush_denormal) or not flush_denormal
    try:
        for _ in range(60):
            kwargs, x = random_pool_2d(generator)
            tiny = ZEROS_AND_DENORMALS[torch.randint(0, 4, x.shape, generator=generator)]
            ref, layer = nn.MaxPool2d(**kwargs), XMaxPool2d(**kwargs)
            geometry = [(v, v) if isinstance(v, int) else v for v in
                        (layer.kernel_size, layer.stride, layer.padding, layer.dilation)]
            assert pooling._native_pool(x, *geometry, layer.ceil_mode) is not None, kwargs
            grad_y = torch.randn(ref(x).shape, generator=generator)
            for x in (x, tiny.requires_grad_()):
                with torch_threads(1):
                    y_ref, gx_ref = run(ref, x, grad_y)
                with torch_threads(threads):
                    y, gx = run(layer, x, grad_y)
                assert torch.equal(y.view(torch.int32), y_ref.view(torch.int32)), kwargs
                assert y.stride() == y_ref.stride(), kwargs
                assert torch.equal(gx.view(torch.int32), gx_ref.view(torch.int32)), kwargs
    finally:
        torch.set_flush_denormal(False)


def test_windows_wholly_in_padding_run_torch_s_kernels():
    """A window with no position in the plane (height 1, kernel 2, dilation 2, padding 1: rows -1 and 1)
    is left to torch's kernels, whose index for it the C kernel would not reproduce."""
    assert pooling._native_out_size((1, 5), (2, 2), (1, 1), (1, 1), (2, 2), False) is None
    assert pooling._native_out_size((3, 5), (2, 2), (1, 1), (1, 1), (2, 2), False) == (3, 5)


def test_fake_inputs_run_torch_s_kernels():
    """Under ``FakeTensorMode`` (memory planning, export) the pool takes torch's path: the C kernels
    must not write through a fake tensor's pointer (they crashed the process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 8, 8)).requires_grad_()
        y = XMaxPool2d(3, 2, 1)(x)
        y.sum().backward()
    assert type(y).__name__ == "FakeTensor" and y.shape == (2, 3, 4, 4) and x.grad.shape == x.shape
