"""xconv.functional: the stateless API, against torch.nn.functional."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats import bias_statistic

import xconv
import xconv.functional as XF

CASES = [  # (function, torch's, input shape, weight shape, keyword geometry)
    (XF.conv1d, F.conv1d, (3, 4, 20), (6, 4, 3), dict(padding=1)),
    (XF.conv2d, F.conv2d, (3, 4, 10, 9), (6, 2, 3, 2), dict(stride=2, padding=(1, 0), dilation=(1, 2), groups=2)),
    (XF.conv2d, F.conv2d, (2, 3, 8, 8), (5, 3, 3, 3), dict(padding="same")),
    (XF.conv3d, F.conv3d, (2, 2, 6, 5, 5), (3, 2, 3, 3, 3), dict(padding=1)),
    (XF.conv_transpose1d, F.conv_transpose1d, (3, 4, 10), (4, 5, 3), dict(stride=2, padding=1, output_padding=1)),
    (XF.conv_transpose2d, F.conv_transpose2d, (2, 4, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1, groups=2)),
    (XF.conv_transpose3d, F.conv_transpose3d, (2, 2, 4, 4, 4), (2, 3, 2, 2, 2), dict(stride=2)),
]
IDS = [f"{f.__name__}-{i}" for i, (f, *_) in enumerate(CASES)]
SKETCHES = [xconv.SketchConfig(probes=4), xconv.SketchConfig(probes=0, storage="quantized", bits=4)]



@pytest.mark.parametrize("sketch", SKETCHES, ids=["sketch", "quantized"])
@pytest.mark.parametrize("fn, torch_fn, in_shape, w_shape, geometry", CASES, ids=IDS)
def test_output_and_input_gradient_are_torchs(fn, torch_fn, in_shape, w_shape, geometry, sketch):
    transposed = "transpose" in fn.__name__
    x, w = torch.randn(in_shape, requires_grad=True), torch.randn(w_shape, requires_grad=True)
    groups = geometry.get("groups", 1)
    b = torch.randn(w_shape[1] * groups if transposed else w_shape[0], requires_grad=True)
    y_ref = torch_fn(x, w, b, **geometry)
    y = fn(x, w, b, **geometry, sketch=sketch, seed=7)
    assert torch.equal(y, y_ref)
    grad_y = torch.randn_like(y)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, b), grad_y)
    gx, gb = torch.autograd.grad(y, (x, b), grad_y)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, torch_fn, in_shape, w_shape, geometry", CASES[1:2] + CASES[5:6], ids=IDS[1:2] + IDS[5:6])
def test_weight_gradient_is_unbiased(fn, torch_fn, in_shape, w_shape, geometry):
    x, w = torch.randn(in_shape), torch.randn(w_shape, requires_grad=True)
    grad_y = torch.randn_like(torch_fn(x, w, **geometry))
    (exact,) = torch.autograd.grad(torch_fn(x, w, **geometry), w, grad_y)
    sketch = xconv.SketchConfig(probes=3)
    draws = torch.stack([torch.autograd.grad(fn(x, w, **geometry, sketch=sketch, seed=s), w, grad_y)[0]
                         for s in range(400)])
    t, threshold = bias_statistic(draws, exact)
    assert t < threshold, f"T={t:.2f} > {threshold:.2f}"
    assert not torch.allclose(draws[0], exact, rtol=0.05)  # an estimate, not the exact gradient


def test_one_seed_gives_the_layers_estimate():
    layer = xconv.convert(torch.nn.Conv2d(3, 4, 3, padding=1), probes=4)
    x = torch.randn(2, 3, 9, 9)
    (layer_grad,) = torch.autograd.grad(layer(x).sum(), layer.weight)
    y = XF.conv2d(x, layer.weight, layer.bias, padding=1, sketch=layer.sketch_config, seed=layer.last_seed)
    (functional_grad,) = torch.autograd.grad(y.sum(), layer.weight)
    assert torch.equal(functional_grad, layer_grad)


def test_without_a_sketch_or_grad_it_is_torch():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    assert torch.equal(XF.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
    with torch.no_grad():
        assert torch.equal(XF.conv2d(x, w, sketch=xconv.SketchConfig(probes=2)), F.conv2d(x, w))


@pytest.mark.parametrize("slope", [None, 0.2])
def test_bit_relu_is_torchs_in_value_and_gradient(slope):
    x = torch.randn(5, 17, requires_grad=True)
    y = XF.bit_relu(x, slope)
    y_ref = F.relu(x) if slope is None else F.leaky_relu(x, slope)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


@pytest.mark.parametrize("call, message", [
    (lambda x, w: XF.conv2d(x, w, sketch={"probes": 4}), r"^sketch must be None or an xconv.SketchConfig"),
    (lambda x, w: XF.conv2d(x, w, sketch=xconv.SketchConfig(probes=4), seed=1.5), r"^seed must be None, an int"),
    (lambda x, w: XF.conv2d(x, w, sketch=xconv.SketchConfig(probes=4), groups=0), r"^groups must be an int >= 1"),
    (lambda x, w: XF.bit_relu(x, "0.1"), r"^negative_slope must be None"),
])
def test_bad_arguments_raise_one_line_naming_them(call, message):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, requires_grad=True)
    with pytest.raises((TypeError, ValueError), match=message) as err:
        call(x, w)
    assert "\n" not in str(err.value)
