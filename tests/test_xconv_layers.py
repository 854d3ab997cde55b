"""XConv layer behaviour around the estimator: RNG, grad modes, dtypes, errors, 1-bit ReLUs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import xconv
from xconv.memory import cuda_peak_memory_bytes, peak_tensor_bytes, saved_tensor_bytes


def _weight_grad(layer, x, grad_y):
    return torch.autograd.grad(layer(x), layer.weight, grad_y)[0]


def test_manual_seed_reproduces_gradient_bit_for_bit():
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=4)
    x, grad_y = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    torch.manual_seed(123)
    first = _weight_grad(layer, x, grad_y)
    second = _weight_grad(layer, x, grad_y)
    torch.manual_seed(123)
    again = _weight_grad(layer, x, grad_y)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)  # each forward draws fresh probes


def test_forward_consumes_global_rng_like_dropout_and_never_reseeds():
    torch.manual_seed(7)
    initial = torch.initial_seed()
    layer = xconv.XConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    state = torch.get_rng_state()
    layer(x).sum().backward()
    assert torch.initial_seed() == initial
    torch.set_rng_state(state)
    torch.randint(0, 2**62, (), dtype=torch.int64)  # exactly one draw per forward
    assert torch.equal(torch.get_rng_state(), _state_after_forward(layer, x, state))


def _state_after_forward(layer, x, state):
    torch.set_rng_state(state)
    layer(x).sum().backward()
    return torch.get_rng_state()


def test_no_grad_keeps_no_sketch_and_matches_torch():
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=8)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert not layer.uses_estimator(x)
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_saved_bytes_are_the_sketch():
    layer = xconv.XConv2d(16, 16, 3, padding=1, probes=8, bias=False)
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    report = saved_tensor_bytes(layer, x)
    assert report.total_bytes == 4 * 16 * 8 * 4  # [B, C_in, r] fp32; the weight is a parameter
    exact = saved_tensor_bytes(nn.Conv2d(16, 16, 3, padding=1, bias=False), x)
    assert exact.total_bytes == x.numel() * 4


def test_multi_mode_sketch_is_batch_by_probes():
    layer = xconv.XConv2d(16, 16, 3, padding=1, probes=8, mode="gaussian", bias=False)
    assert layer.sketch_config.mode == "multi"
    report = saved_tensor_bytes(layer, torch.randn(4, 16, 32, 32, requires_grad=True))
    assert report.total_bytes == 4 * 8 * 4


def test_double_backward_raises():
    layer = xconv.XConv2d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_cpu_autocast_bf16_runs_in_compute_dtype():
    ref = nn.Conv2d(8, 8, 3, padding=1)
    layer = xconv.XConv2d(8, 8, 3, padding=1, probes=16)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = layer(x), ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


def test_channels_last_input():
    ref = nn.Conv2d(8, 8, 3, padding=1)
    layer = xconv.XConv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, ref(x))
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape


def test_torch_compile_runs():
    layer = xconv.XConv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="eager")  # graph breaks are allowed
    compiled(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_min_pixels_and_default_skip():
    layer = xconv.XConv2d(4, 4, 3, padding=1, probes=16)
    assert not layer.uses_estimator(torch.randn(1, 4, 4, 4, requires_grad=True))  # 16 pixels <= r
    assert layer.uses_estimator(torch.randn(1, 4, 5, 4, requires_grad=True))
    layer.min_pixels = 64
    assert not layer.uses_estimator(torch.randn(1, 4, 7, 7, requires_grad=True))
    assert layer.uses_estimator(torch.randn(1, 4, 8, 8, requires_grad=True))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(probes=-1), ValueError, "probes must be >= 0"),
        (dict(probes=2.0), TypeError, "probes must be an int"),
        (dict(probes=True), TypeError, "probes must be an int"),
        (dict(mode="roll"), ValueError, "mode must be one of"),
        (dict(distribution="uniform"), ValueError, "distribution must be one of .*gaussian.*rademacher"),
        (dict(contraction="fast"), ValueError, "contraction must be one of"),
        (dict(mode="multi", per_sample=True), ValueError, "per_sample=True needs mode='independent'"),
        (dict(min_pixels=-3), ValueError, "min_pixels must be None or an int"),
        (dict(deflation="svd"), ValueError, "deflation must be None or one of .*dct.*pca"),
        (dict(deflation="dct", mode="multi"), ValueError, "deflation='dct' needs mode='independent'"),
        (dict(deflation="pca", deflation_rank=8), ValueError, "deflation_rank must be in 1 .. probes - 1 = 7"),
        (dict(deflation="pca", deflation_rank=0), ValueError, "deflation_rank must be in 1 .. probes - 1"),
        (dict(deflation="pca", deflation_rank=True), TypeError, "deflation_rank must be None or an int"),
        (dict(deflation_rank=2), ValueError, "deflation_rank=2 needs deflation='dct' or 'pca'"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        xconv.XConv2d(4, 4, 3, **kwargs)


def test_set_probes_validates():
    layer = xconv.XConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="probes must be >= 0"):
        layer.probes = -2
    deflated = xconv.XConv2d(4, 4, 3, probes=8, deflation="dct", deflation_rank=6)
    with pytest.raises(ValueError, match="deflation_rank must be in 1 .. probes - 1 = 5"):
        deflated.probes = 6
    assert deflated.probes == 8


# --------------------------------------------------------------------------- 1-bit activations


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda inplace: (nn.ReLU(inplace), xconv.BitReLU(inplace)),
        lambda inplace: (nn.LeakyReLU(0.2, inplace), xconv.BitLeakyReLU(0.2, inplace)),
    ],
    ids=["relu", "leaky"],
)
def test_bit_activation_matches_torch(make, inplace):
    ref, bit = make(inplace)
    base = torch.randn(3, 5, 7, 9)
    base[0, 0, 0, :3] = 0.0  # the kink: both must take the x <= 0 branch
    grads = []
    outs = []
    for act in (ref, bit):
        leaf = base.clone().requires_grad_()
        out = act(leaf * 1.0)  # non-leaf input so inplace is allowed
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out))
        outs.append(out.detach())
        grads.append(leaf.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


def test_bit_relu_keeps_one_bit_per_element():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    fp32 = saved_tensor_bytes(nn.ReLU(), x * 1.0).total_bytes
    bit = saved_tensor_bytes(xconv.BitReLU(), x * 1.0).total_bytes
    assert fp32 == x.numel() * 4
    assert bit * 32 == fp32


def test_pack_bits_roundtrip_odd_length():
    mask = torch.rand(3, 7, 5) > 0.5
    packed = xconv.functional.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(xconv.functional.unpack_bits(packed, mask.shape), mask)


def test_peak_tensor_bytes_counts_live_storages():
    def fn():
        a = torch.ones(2**18)  # 1 MiB
        b = torch.ones(2**18) * 2  # 2 MiB at once (ones + product), 1 MiB after
        del a
        return b.sum()

    assert peak_tensor_bytes(fn) == 3 * 2**20


def test_saved_bytes_by_module():
    model = nn.Sequential(xconv.XConv2d(4, 8, 3, padding=1, probes=4), xconv.BitReLU())
    x = torch.randn(2, 4, 16, 16)
    report = saved_tensor_bytes(lambda: model(x).sum(), model=model)
    assert report.by_module == {"0": 2 * 4 * 4 * 4, "1": 2 * 8 * 16 * 16 // 8}


def test_cuda_peak_is_none_for_a_cpu_run_on_a_gpu_machine(monkeypatch):
    # A CPU run (trainer.accelerator=cpu) on a machine with a GPU: nothing to measure, and no CUDA call.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    assert cuda_peak_memory_bytes(calls.append, 1, device=torch.device("cpu")) is None
    assert cuda_peak_memory_bytes(calls.append, 1, device="cpu") is None
    assert calls == []
