"""The XConv estimator against exact PyTorch gradients, on fresh random inputs.

Forward outputs, input and bias gradients must equal the torch layer's; the weight-gradient
estimate must be unbiased (checked with a variance-derived statistic, see ``stats.py``) for
every geometry, and its variance must fall as 1/r.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import xconv
import xconv._cost
from xconv._cost import FLIP_MIN_PIXELS
from xconv._geometry import ConvGeometry
from stats import assert_sum_to_rounding, bias_statistic, total_variance

TORCH = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}
XCONV = {key: xconv.nn.XCONV_CLASSES[cls] for key, cls in TORCH.items()}

# (id, spatial dims, transposed, constructor kwargs, input spatial shape)
GEOMETRIES = [
    ("1d-k3-p1", 1, False, dict(kernel_size=3, padding=1), (12,)),
    ("1d-k4-s2-valid", 1, False, dict(kernel_size=4, stride=2, padding="valid"), (13,)),
    ("1d-d2-circular", 1, False, dict(kernel_size=3, dilation=2, padding=2, padding_mode="circular"), (11,)),
    ("2d-k3-p1", 2, False, dict(kernel_size=3, padding=1), (6, 6)),
    ("2d-k3x1", 2, False, dict(kernel_size=(3, 1), padding=(1, 0)), (6, 5)),
    ("2d-k4-s2-p1-dcgan", 2, False, dict(kernel_size=4, stride=2, padding=1), (8, 8)),
    ("2d-k4-same-even", 2, False, dict(kernel_size=4, padding="same"), (6, 7)),
    ("2d-k2x3-same-reflect", 2, False, dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"), (6, 6)),
    ("2d-reflect", 2, False, dict(kernel_size=3, padding=1, padding_mode="reflect"), (6, 6)),
    ("2d-replicate-s2", 2, False, dict(kernel_size=3, stride=2, padding=2, padding_mode="replicate"), (7, 6)),
    ("2d-circular", 2, False, dict(kernel_size=3, padding=1, padding_mode="circular"), (6, 6)),
    ("2d-groups2", 2, False, dict(kernel_size=3, padding=1, groups=2), (6, 6)),
    ("2d-depthwise", 2, False, dict(kernel_size=3, padding=1, groups=4, out_channels=8), (6, 6)),
    ("2d-d2-s2-nobias", 2, False, dict(kernel_size=3, dilation=2, stride=2, padding=2, bias=False), (9, 8)),
    ("2d-1x1", 2, False, dict(kernel_size=1), (5, 5)),
    ("3d-k3-s122", 3, False, dict(kernel_size=3, stride=(1, 2, 2), padding=1), (4, 5, 5)),
    ("t1d-s2-op1", 1, True, dict(kernel_size=3, stride=2, padding=1, output_padding=1), (10,)),
    ("t2d-k4-s2-p1-dcgan", 2, True, dict(kernel_size=4, stride=2, padding=1), (4, 4)),
    ("t2d-groups2-d2", 2, True, dict(kernel_size=3, dilation=2, padding=1, groups=2), (5, 5)),
    ("t2d-k3x2-s21-op", 2, True, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0)), (4, 5)),
    ("t3d-s2", 3, True, dict(kernel_size=2, stride=2), (3, 3, 3)),
]
GEOMETRY_IDS = [g[0] for g in GEOMETRIES]

# (id, estimator kwargs): every geometry is checked with all of these.
ESTIMATORS = [
    ("independent-probes", dict(mode="independent", contraction="probes")),
    ("independent-decompress", dict(mode="independent", contraction="decompress")),
    ("per-sample-rademacher", dict(mode="independent", per_sample=True, distribution="rademacher")),
    ("multi", dict(mode="multi")),
    ("orthogonal", dict(mode="orthogonal")),
    ("deflated-dct", dict(deflation="dct", contraction="probes")),
    ("deflated-pca-per-sample", dict(deflation="pca", deflation_rank=3, per_sample=True, contraction="decompress")),
    ("sketch-8bit-capped", dict(bits=8, max_compression=3, contraction="probes")),
    ("sketch-16bit-multi", dict(bits=16, mode="multi")),
    ("quantized-2bit", dict(storage="quantized", bits=2)),
    ("quantized-4bit", dict(storage="quantized", bits=4)),
    ("quantized-8bit", dict(storage="quantized", bits=8)),
    ("quantized-16bit", dict(storage="quantized", bits=16)),
]


def make_pair(geometry, probes=8, **xkw):
    """A torch layer and an XConv layer with the same weights, plus a fresh input."""
    _, dims, transposed, kwargs, spatial = geometry
    kwargs = dict(kwargs)
    in_channels, out_channels = 4, kwargs.pop("out_channels", 6)
    ref = TORCH[dims, transposed](in_channels, out_channels, **kwargs)
    layer = XCONV[dims, transposed](in_channels, out_channels, probes=probes, **kwargs, **xkw)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, in_channels, *spatial)
    return ref, layer, x


def exact_grads(ref, x):
    x = x.clone().requires_grad_(True)
    y = ref(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    return y.detach(), grad_y, x.grad, ref.weight.grad, None if ref.bias is None else ref.bias.grad


def weight_grad_draws(layer, x, grad_y, draws):
    samples = []
    for _ in range(draws):
        (gw,) = torch.autograd.grad(layer(x), layer.weight, grad_y)
        samples.append(gw)
    return torch.stack(samples)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_forward_and_input_grad_exact(geometry, estimator):
    ref, layer, x = make_pair(geometry, **estimator[1])
    assert_exact_but_the_weight_grad(ref, layer, x)


def assert_exact_but_the_weight_grad(ref, layer, x):
    """Forward bit for bit, input gradient to rounding and bias gradient within the rounding bound of a
    float sum, with the estimator running; returns ``(grad_y, exact weight gradient)``."""
    y, grad_y, gx, gw, gb = exact_grads(ref, x)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    assert layer.uses_estimator(x)
    out.backward(grad_y)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
    if gb is not None:
        assert_sum_to_rounding(layer.bias.grad, grad_y, [0, *range(2, grad_y.dim())])
    return grad_y, gw


# Maps with at least FLIP_MIN_PIXELS output pixels: on CPU at stride 1 the input gradient is a
# conv with the flipped kernel there, unless the padding exceeds the kernel's reach ("k1-p1").
LARGE_MAPS = [
    ("1d-k3-p1", 1, False, dict(kernel_size=3, padding=1), (FLIP_MIN_PIXELS,)),
    ("2d-k3-p1", 2, False, dict(kernel_size=3, padding=1), (32, 32)),
    ("2d-k4-same-even", 2, False, dict(kernel_size=4, padding="same"), (32, 33)),
    ("2d-groups2-d2", 2, False, dict(kernel_size=3, dilation=2, padding=1, groups=2), (36, 36)),
    ("2d-k3x1-d3x1", 2, False, dict(kernel_size=(3, 1), dilation=(3, 1), padding=(2, 0)), (34, 32)),
    ("2d-k1-p1", 2, False, dict(kernel_size=1, padding=1), (32, 32)),
    ("2d-k3-s2", 2, False, dict(kernel_size=3, stride=2, padding=1), (64, 64)),
    ("3d-k3-p1", 3, False, dict(kernel_size=3, padding=1), (11, 11, 11)),
]


@pytest.mark.parametrize("geometry", LARGE_MAPS, ids=[g[0] for g in LARGE_MAPS])
def test_input_grad_exact_on_large_maps(geometry):
    ref, layer, x = make_pair(geometry, contraction="decompress")
    y, grad_y, gx, _, _ = exact_grads(ref, x)
    assert math.prod(y.shape[2:]) >= FLIP_MIN_PIXELS
    x = x.clone().requires_grad_(True)
    layer(x).backward(grad_y)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=[e[0] for e in ESTIMATORS])
def test_weight_grad_unbiased(geometry, estimator):
    ref, layer, x = make_pair(geometry, **estimator[1])
    _, grad_y, _, gw, _ = exact_grads(ref, x)
    samples = weight_grad_draws(layer, x, grad_y, draws=600)
    t, threshold = bias_statistic(samples, gw)
    assert t < threshold, f"Monte-Carlo mean deviates from the exact gradient: T={t:.2f} > {threshold:.2f}"


def rolled_estimate(x, grad_y, weight_shape, probes, padding):
    """The reference code's fault: probes shifted by a circular roll of the flattened image."""
    b, c_in, h, w = x.shape
    k = weight_shape[-1]
    z = torch.randn(h * w, probes) / math.sqrt(probes)
    sketch = x.flatten(2) @ z  # [B, C_in, r]
    d = grad_y.flatten(2)  # [B, C_out, n]
    dw = torch.empty(weight_shape)
    for kh in range(k):
        for kw in range(k):
            shift = (kh - padding) * w + (kw - padding)
            zk = torch.roll(z, -shift, dims=0)  # wraps rows into each other
            dw[:, :, kh, kw] = torch.einsum("bon,nj,bij->oi", d, zk, sketch)
    return dw


def test_bias_statistic_rejects_circular_roll_estimator():
    """The unbiasedness check must fail for the roll-based estimator it exists to catch."""
    ref = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 6, 6)
    _, grad_y, _, gw, _ = exact_grads(ref, x)
    samples = torch.stack([rolled_estimate(x, grad_y, gw.shape, 8, 1) for _ in range(600)])
    t, threshold = bias_statistic(samples, gw)
    assert t > threshold


@pytest.mark.parametrize(
    "kwargs",
    [dict(mode="independent"), dict(mode="independent", distribution="rademacher"), dict(mode="multi")],
    ids=["independent", "rademacher", "multi"],
)
def test_variance_falls_as_one_over_r(kwargs):
    geometry = GEOMETRIES[GEOMETRY_IDS.index("2d-k3-p1")]
    ref, layer, x = make_pair(geometry, probes=4, **kwargs)
    _, grad_y, _, _, _ = exact_grads(ref, x)
    var_4 = total_variance(weight_grad_draws(layer, x, grad_y, draws=800))
    layer.probes = 16
    var_16 = total_variance(weight_grad_draws(layer, x, grad_y, draws=800))
    # Exactly 4x in expectation; 800 draws estimate each trace within ~10%.
    assert 3.0 < var_4 / var_16 < 5.3


# Both orders must give the same estimate from the same probes, in every layout of the probes'
# im2col: 1-d and 1xk kernels on one-row maps make it a strided view, not a copy.
AGREE = [GEOMETRIES[GEOMETRY_IDS.index(g)] for g in ("2d-k4-s2-p1-dcgan", "1d-k3-p1", "t2d-k4-s2-p1-dcgan", "3d-k3-s122")]
AGREE.append(("2d-k1x3-one-row", 2, False, dict(kernel_size=(1, 3)), (1, 32)))


@pytest.mark.parametrize("geometry", AGREE, ids=[g[0] for g in AGREE])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_contraction_orders_agree_for_the_same_probes(geometry, per_sample):
    ref, _, x = make_pair(geometry)
    grad_y = torch.randn_like(ref(x))
    grads = []
    for order in ("probes", "decompress"):
        _, layer, _ = make_pair(geometry, contraction=order, per_sample=per_sample)
        layer.load_state_dict(ref.state_dict())
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(layer(x), layer.weight, grad_y)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("geometry", AGREE, ids=[g[0] for g in AGREE])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_probe_blocks_do_not_change_the_estimate(geometry, per_sample, monkeypatch):
    """Building A in blocks of samples and taps (small maps) gives the one-block estimate."""
    ref, layer, x = make_pair(geometry, contraction="probes", per_sample=per_sample)
    grad_y = torch.randn_like(ref(x))
    grads = []
    for blocks in [(x.shape[0], 10**6), (x.shape[0], 1), (1, 1), (2, 3)]:  # whole first
        monkeypatch.setattr(xconv._cost, "probe_blocks", lambda *args, blocks=blocks: blocks)
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(layer(x), layer.weight, grad_y)[0])
    for got in grads[1:]:
        torch.testing.assert_close(got, grads[0], rtol=1e-4, atol=1e-5)


# (batch, C_in, C_out, kernel, stride, map): the order "auto" must pick on the layers measured in
# results/bench/README.md (run H), the cheaper one there.
MEASURED_CHOICES = [
    ((64, 512, 512, 3, 1, 4), "probes"),      # 0.83x exact vs 0.95-0.99x decompressing
    ((64, 256, 512, 3, 2, 8), "probes"),      # 0.85-0.94x vs 1.02-1.05x
    ((64, 128, 128, 3, 1, 4), "decompress"),  # 18 blocks: 1.31-1.36x vs 1.10-1.14x
    ((64, 64, 128, 3, 2, 8), "decompress"),   # 1.32-1.40x vs 1.12-1.33x
    ((64, 64, 64, 3, 1, 8), "probes"),        # 0.90-0.94x vs 0.99-1.13x
    ((64, 3, 64, 7, 2, 32), "decompress"),    # 1.30-1.32x vs 1.06-1.07x
    ((8, 768, 256, 3, 1, 8), "probes"),       # 0.77-0.84x vs 1.02-1.08x
    ((8, 512, 512, 3, 1, 4), "decompress"),   # 1.08-1.12x vs 1.01x
]


@pytest.mark.parametrize("shape, order", MEASURED_CHOICES, ids=[str(s) for s, _ in MEASURED_CHOICES])
def test_auto_contraction_picks_the_measured_faster_order(shape, order):
    batch, c_in, c_out, k, stride, size = shape
    pad = k // 2
    out = (size + 2 * pad - k) // stride + 1
    geom = ConvGeometry((stride, stride), (pad, pad), (1, 1), 1)
    cfg = xconv.SketchConfig(probes=8)
    got = xconv._cost.choose_contraction(cfg, (batch, c_in, size, size), (batch, c_out, out, out),
                                        (c_out, c_in, k, k), geom)
    assert got == order


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_contraction_cost_counts_the_blocks_backward_builds(transposed, monkeypatch):
    """The cost model must see the pixels of D that the probes order contracts over (a transposed
    conv's output pixels, not its input pixels)."""
    calls = []
    blocks = xconv._cost.probe_blocks
    monkeypatch.setattr(xconv._cost, "probe_blocks", lambda *args: calls.append(args[1:]) or blocks(*args))
    make = xconv.XConvTranspose2d if transposed else xconv.XConv2d
    layer = make(16, 8, 4, stride=2, padding=1, probes=8, contraction="probes")
    x = torch.randn(4, 16, 6, 6)
    y = layer(x)
    torch.autograd.grad(y, layer.weight, torch.randn_like(y))
    geom = ConvGeometry((2, 2), (1, 1), (1, 1), 1, transposed, (0, 0))
    xconv._cost.choose_contraction(xconv.SketchConfig(probes=8), x.shape, y.shape, layer.weight.shape, geom)
    assert len(calls) == 2 and calls[0] == calls[1]


def test_probes_zero_is_the_torch_layer():
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=0)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    _, grad_y, _, gw, _ = exact_grads(ref, x)
    assert not layer.uses_estimator(x.requires_grad_())
    (got,) = torch.autograd.grad(layer(x), layer.weight, grad_y)
    torch.testing.assert_close(got, gw)


def test_error_shrinks_towards_exact_as_r_grows():
    """r -> infinity recovers the exact gradient."""
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=4096)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    _, grad_y, _, gw, _ = exact_grads(ref, x)
    (got,) = torch.autograd.grad(layer(x), layer.weight, grad_y)
    # relative error ~ sqrt(n / r) = sqrt(64 / 4096) = 0.125 per draw
    assert (got - gw).norm() / gw.norm() < 0.4


# Options set after construction (as output-stride conversion in segmentation encoders does):
# (id, spatial dims, transposed, constructor kwargs, options set afterwards, input spatial shape)
MUTATED = [
    ("1d-padding-dilation", 1, False, dict(kernel_size=3, padding=1), dict(padding=(2,), dilation=(2,)), (12,)),
    ("2d-padding-dilation", 2, False, dict(kernel_size=3, padding=1), dict(padding=(2, 2), dilation=(2, 2)), (8, 8)),
    ("2d-stride", 2, False, dict(kernel_size=3, padding=1), dict(stride=(2, 2)), (9, 8)),
    ("2d-same-even", 2, False, dict(kernel_size=4, padding=1), dict(padding="same"), (6, 7)),
    ("2d-valid", 2, False, dict(kernel_size=3, padding=1), dict(padding="valid"), (6, 6)),
    ("2d-reflect", 2, False, dict(kernel_size=3, padding=1), dict(padding_mode="reflect"), (6, 6)),
    ("3d-padding-dilation", 3, False, dict(kernel_size=3, padding=1), dict(padding=(2, 2, 2), dilation=(2, 2, 2)), (5, 5, 5)),
    ("1d-ints", 1, False, dict(kernel_size=3), dict(padding=2, dilation=2, stride=2), (12,)),
    ("2d-ints", 2, False, dict(kernel_size=3, padding=1), dict(padding=2, dilation=2, stride=1), (8, 8)),
    ("2d-same-even-int-dilation", 2, False, dict(kernel_size=4, padding=1), dict(padding="same", dilation=1), (6, 7)),
    ("t1d-padding-op", 1, True, dict(kernel_size=3, stride=2, padding=1), dict(padding=(0,), output_padding=(1,)), (6,)),
    ("t2d-stride-dilation-op", 2, True, dict(kernel_size=3, padding=1), dict(stride=(2, 2), dilation=(2, 2), output_padding=(1, 1)), (4, 4)),
    ("t3d-padding", 3, True, dict(kernel_size=2, stride=2), dict(padding=(1, 1, 1)), (3, 3, 3)),
]


@pytest.mark.parametrize("when", ["before-convert", "after-convert"])
@pytest.mark.parametrize("estimator", [{}, dict(storage="quantized", bits=4)], ids=["sketch", "quantized-4bit"])
@pytest.mark.parametrize("case", MUTATED, ids=[m[0] for m in MUTATED])
def test_options_set_after_construction_act_as_in_torch(case, estimator, when):
    """The estimator reads padding, dilation, stride, output padding and padding mode at call time, as
    torch's forward does: forward, input gradient and the weight-gradient mean match the torch layer."""
    name, dims, transposed, kwargs, options, spatial = case
    ref = TORCH[dims, transposed](4, 6, **kwargs)

    def mutate(layer):
        for key, value in options.items():
            setattr(layer, key, value)

    if when == "before-convert":
        mutate(ref)
    layer = xconv.convert(copy.deepcopy(ref), probes=8, min_pixels=0, **estimator)
    if when == "after-convert":
        mutate(ref)
        mutate(layer)
    x = torch.randn(3, 4, *spatial)
    grad_y, gw = assert_exact_but_the_weight_grad(ref, layer, x)
    t, threshold = bias_statistic(weight_grad_draws(layer, x, grad_y, draws=300), gw)
    assert t < threshold, f"Monte-Carlo mean deviates from the exact gradient: T={t:.2f} > {threshold:.2f}"


def test_same_padding_with_a_stride_set_later_is_refused_as_in_torch():
    layer = xconv.XConv2d(4, 6, 3, padding="same", probes=8)
    layer.stride = (2, 2)
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided"):
        layer(torch.randn(2, 4, 8, 8))
