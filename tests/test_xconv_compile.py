"""torch.compile: counter-based probes (xconv.rng), converted models without graph breaks, and
compiled gradients that match eager ones and stay unbiased."""
from __future__ import annotations

import copy
import math

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

import xconv
import xconv.batchnorm
import xconv.nn
from xconv import rng
from stats import bias_statistic

MASK64 = (1 << 64) - 1
SR4 = dict(storage="quantized", bits=4, batchnorm_bits=4, maxpool=True)


def _reference_finalize(z: int) -> int:
    """splitmix64's finalizer on Python ints (Steele, Lea, Flood 2014), for unsigned 64-bit z."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _reference_bits(seed: int, streams, count: int) -> list[int]:
    key = seed & MASK64
    for stream in streams:
        key = _reference_finalize((key + (stream + 1) * 0x9E3779B97F4A7C15) & MASK64)
    return [_reference_finalize((((i + 1) ^ key) * 0x9E3779B97F4A7C15) & MASK64) for i in range(count)]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_streams_equal_an_independent_splitmix64_on_every_device_and_call():
    seed = int(rng.draw_seed())
    count = 3 * (1 << 15) + 5  # several of the eager blocks and a partial one
    expected = _reference_bits(seed, (0, 7), count)
    for device in _devices():
        key = rng.key(torch.tensor(seed), 0, 7)
        for _ in range(2):
            bits = rng.random_bits(key, count, device).cpu()
            assert [b & MASK64 for b in bits.tolist()] == expected, device


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "uniform16"])
def test_stream_moments_and_independence(kind):
    """Mean, variance and fourth moment of 2^20 draws within 6 standard errors of the target's, and
    two streams of one seed uncorrelated (6 standard errors of a correlation: 6 / sqrt(n))."""
    n = 1 << 20
    seed = rng.draw_seed()
    draw = {
        "gaussian": lambda k: rng.gaussian(k, (n,), "cpu").double(),
        "rademacher": lambda k: rng.rademacher(k, (n,), "cpu").double(),
        "uniform16": lambda k: (rng.uniform16(k, n, "cpu").double() + 32768.5) / 65536 - 0.5,
    }[kind]
    # (variance, fourth moment, variance of x^2, variance of x^4) of N(0,1), +-1 and U(-1/2, 1/2)
    var, m4, var2, var4 = {"gaussian": (1, 3, 2, 96), "rademacher": (1, 1, 0, 0),
                           "uniform16": (1 / 12, 1 / 80, 1 / 80 - 1 / 144, 1 / 2304 - 1 / 6400)}[kind]
    x, y = draw(rng.key(seed, 0)), draw(rng.key(seed, 1))
    assert abs(x.mean()) < 6 * math.sqrt(var / n)
    assert abs(x.square().mean() - var) <= 6 * math.sqrt(var2 / n) + 1e-12
    assert abs(x.pow(4).mean() - m4) <= 6 * math.sqrt(var4 / n) + 1e-12
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 6 / math.sqrt(n)


def test_compiled_streams_are_bit_identical_to_eager():
    """Keys are Python ints eagerly and tensors in compiled code; sizes past one eager block
    (xconv.rng hashes eagerly in blocks, in compiled code whole)."""
    def streams(seed):
        return (rng.gaussian(rng.key(seed, 3), (3, 16667), "cpu"), rng.rademacher(rng.key(seed, 4), ((1 << 21) + 5,), "cpu"),
                rng.uniform16(rng.key(seed, 5, 1), 200003, "cpu"))

    seed = rng.draw_seed()
    compiled = torch.compile(streams, backend="inductor", fullgraph=True)
    for eager, traced in zip(streams(seed), compiled(seed), strict=True):
        assert torch.equal(eager, traced)


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch-ops"])
def test_compiled_sr_storage_is_bit_identical_to_eager(native, monkeypatch):
    """Compiled quantize stores what eager quantize (the C kernels) stores, for a tensor far from zero,
    calling the C kernels as custom ops or (as on other devices) running inductor's code for the torch
    ops: there any other rounding of the grid positions (a fused multiply-add) would change codes."""
    import xconv.quantize as quantize_module

    x = torch.randn(4, 16, 32, 32) + 1000
    key = rng.draw_seed()
    want = quantize_module.quantize(x, 4, key).tensors()
    if not native:
        monkeypatch.setattr(quantize_module, "_native_applies", lambda *args: False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: quantize_module.quantize(t, 4, key).tensors(), backend="inductor",
                             fullgraph=True)
    for got, expected in zip(compiled(x), want, strict=True):
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))



@pytest.mark.parametrize("negative_slope", [None, 0.1], ids=["relu", "leaky"])
def test_bit_relu_custom_ops_pass_opcheck(negative_slope):
    """The 1-bit ReLU's custom ops (what compiled graphs keep and call): schema, fake outputs of the real
    ones' shape, dtype and strides (channels_last, a length not a multiple of 8), autograd
    registration and tracing, as ``torch.library.opcheck`` checks them."""
    from xconv._bits import sign_bits, sign_bits_backward

    x = torch.randn(3, 5, 7, 9).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, -1.0])
    leaky = negative_slope is not None
    torch.library.opcheck(sign_bits, (x, leaky))
    packed = sign_bits(x, leaky)
    torch.library.opcheck(sign_bits_backward, (torch.randn_like(x), packed, negative_slope))


def _small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.ConvTranspose2d(8, 4, 2, stride=2),
    )


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _assert_gradients_close(model, other, rtol):
    """Every parameter's gradient within ``rtol`` of the largest entry of the model's gradients."""
    scale = max(p.grad.abs().max() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("options", [dict(probes=8), SR4], ids=["sketch", "sr4"])
def test_converted_unet_compiles_whole_and_matches_eager(options, fixed_seeds):
    """fullgraph=True fails on any graph break. With aot_eager and the same seeds the gradients agree.
    (ResNet-18 compiles whole too: scripts/bench_speed.py counts its breaks, and its blocks are the
    U-Net encoder's.)"""
    model = xconv.convert(smp.Unet("resnet18", encoder_weights=None, classes=3).train(), **options)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second step runs the compiled graph without tracing
        fixed_seeds()
        _step(model, x)
        fixed_seeds()
        _step(compiled, x)
        _assert_gradients_close(model, twin, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(probes=4), dict(probes=4, mode="multi", distribution="rademacher"), SR4],
                         ids=["independent", "multi-rademacher", "sr4"])
def test_inductor_gradients_equal_eager_for_the_same_seeds(options, fixed_seeds):
    model = xconv.convert(_small_cnn(), **options)
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="inductor", fullgraph=True)
    _step(model, x)
    fixed_seeds()
    _step(compiled, x)
    _assert_gradients_close(model, twin, rtol=1e-4)


@pytest.mark.parametrize("backend, shared", [("inductor", False), ("aot_eager", True)], ids=["inductor", "shared-aot_eager"])
def test_compiled_estimate_is_unbiased(backend, shared):
    """The seed of a forward reaches its backward in compiled code too: the partitioner must not
    draw it again in the backward graph (the probes would then not be the sketch's: the mean was
    ~0, T ~ 1e2, for one layer; for a layer called twice, whose first seed no later state kept,
    T was ~12)."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.Tanh(), conv) if shared else nn.Sequential(conv)
    x, grad_y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    net(x).backward(grad_y)
    exact = conv.weight.grad.clone()
    layer = xconv.convert(net, probes=4)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    draws = []
    for _ in range(300):
        layer.zero_grad(set_to_none=True)
        compiled(x).backward(grad_y)
        draws.append(layer[0].weight.grad.clone())
    t, threshold = bias_statistic(torch.stack(draws), exact)
    assert t < threshold, f"T={t:.2f} > {threshold:.2f}"


def test_a_new_input_size_compiles_anew_with_static_shapes():
    """README: dynamic shapes are not supported; with dynamic=False each input size gets its graph."""
    model = xconv.convert(_small_cnn(), **SR4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False, fullgraph=True)
    for size in (16, 24, 16):
        _step(compiled, torch.randn(2, 3, size, size))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
