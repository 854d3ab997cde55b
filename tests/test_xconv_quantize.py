"""SR low-bit storage (``xconv.quantize``) and the conv layers that keep their input in it."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import xconv
from xconv import _native
from xconv import quantize as quantize_module
from xconv.memory import saved_tensor_bytes
from xconv._bits import pack_bits, pack_codes, sign_bits, unpack_codes
from xconv.quantize import GROUP_SIZE, dequantize, quantize, stored_bytes
from kernels import needs_kernels, torch_threads
from stats import bias_statistic, total_variance


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (8 * 37,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


LAYOUTS = {
    "contiguous": lambda: torch.randn(3, 5, 7, 9),
    "channels-last": lambda: torch.randn(3, 5, 7, 9).to(memory_format=torch.channels_last),
    "strided-slice": lambda: torch.randn(3, 5, 7, 18)[..., ::2],
    "1-d": lambda: torch.randn(130),
    "fp64": lambda: torch.randn(4, 33, dtype=torch.float64),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_is_unbiased_and_keeps_the_layout(layout, bits):
    x = LAYOUTS[layout]()
    draws = torch.stack([dequantize(quantize(x, bits)) for _ in range(400)])
    one = dequantize(quantize(x, bits))
    assert one.shape == x.shape and one.dtype == x.dtype
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        assert one.is_contiguous(memory_format=torch.channels_last)
    t, threshold = bias_statistic(draws, x)
    assert t < threshold, f"T={t:.2f} > {threshold:.2f}"
    # Every stored value lies on the grid around x: at most one step (range / (2^b - 1)) away.
    span = x.max() - x.min()
    step = span / ((1 << bits) - 1) if bits < 16 else x.abs().max() * 2**-7
    assert (one - x).abs().max() <= step * 1.01


def test_bias_statistic_rejects_deterministic_rounding(monkeypatch):
    """Rounding down (no noise) is biased; the unbiasedness check must catch it."""
    x = torch.randn(4, 64)
    monkeypatch.setattr(quantize_module, "_native_applies", lambda *args: None)  # the noise of the torch-op code
    lowest = lambda key, count, device: torch.full((count,), -(1 << 15), dtype=torch.int16)  # u = 2^-17
    monkeypatch.setattr(xconv.rng, "uniform16", lowest)
    draws = torch.stack([dequantize(quantize(x, 4)) + 1e-4 * torch.randn_like(x) for _ in range(100)])
    t, threshold = bias_statistic(draws, x)
    assert t > threshold


# (shape, dtype, channels_last, mean in standard deviations: None for a random scale and mean)
NATIVE_CASES = {
    "nchw": ((3, 5, 7, 9), torch.float32, False, None),  # rows of 63: one padded group each
    "channels-last": ((4, 6, 16, 12), torch.float32, True, None),
    "several-groups": ((2, 3, 33, 31), torch.float32, False, None),  # 16 full groups and a padded one per row
    "short-rows": ((2, 3, 2, 3), torch.float32, False, None),  # groups of 6: 2-bit codes of one byte span groups
    "odd-rows": ((5, 1, 1, 3), torch.float32, False, None),  # groups of 3
    "2-d": ((6, 70), torch.float32, False, None),
    "1-d": ((130,), torch.float32, False, None),
    "bf16": ((2, 4, 9, 9), torch.bfloat16, False, None),
    "fp16": ((2, 4, 9, 9), torch.float16, True, None),
    # Offsets far above the spread: the grid position (x - lo) / step is then a difference of large
    # terms, where any other rounding of it (a multiply-add not fused as torch's) changes codes.
    "far-mean": ((4, 16, 32, 32), torch.float32, False, 1000.0),
}


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", NATIVE_CASES, ids=list(NATIVE_CASES))
def test_native_kernels_store_the_bits_of_the_torch_ops(case, bits, threads, monkeypatch):
    """The C kernels (eager CPU code) and the torch ops (compiled code, other devices) keep the same
    codes, offsets and steps, and restore the same tensor, for fresh random inputs of any scale."""
    lib = _native.kernels()
    assert lib is not None, "the C kernels of SR storage did not build"
    monkeypatch.setattr(quantize_module, "_QUANTIZE_PARALLEL_MIN_ELEMENTS", 1)  # threads even for small ones
    monkeypatch.setattr(_native, "PARALLEL_MIN_ELEMENTS", 1)
    shape, dtype, channels_last, mean = NATIVE_CASES[case]
    if mean is None:
        x = torch.randn(shape) * 10.0 ** torch.randint(-4, 5, ()).item() + torch.randn(())
    else:
        x = torch.randn(shape) + mean
    x = x.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    key = int(torch.randint(0, 1 << 62, ()))
    layout = tuple(x.shape), quantize_module._dense_strides(x)
    with torch_threads(threads):
        native = quantize_module._quantize_native(lib, x, bits, key, *layout)
        restored = quantize_module._dequantize_native(lib, native)
    ops = quantize_module._quantize_ops(x, bits, key, *layout)
    assert_same_storage(native, restored, ops, f"key {key}")


def assert_same_storage(native, restored, ops, context=""):
    """Codes, offsets and steps (their bits: signed zeros and NaNs included) and the restored tensor
    (layout, dtype, values and signs) of the C kernels equal the torch ops'; codes of NaN groups
    excepted (the torch ops' cast of NaN to an integer is undefined; the kernel writes 0)."""
    for name in ("lo", "scale"):
        got, want = getattr(native, name), getattr(ops, name)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name} differs, {context}"
    codes_ok = torch.equal(native.codes, ops.codes)
    if not codes_ok and ops.lo.isnan().any():
        group = native.codes.numel() * 8 // native.bits // native.lo.numel()
        finite = ~ops.lo.isnan().repeat_interleave(group)
        codes_ok = torch.equal(unpack_codes(native.codes, native.bits)[: finite.numel()][finite],
                               unpack_codes(ops.codes, ops.bits)[: finite.numel()][finite])
    assert codes_ok, f"codes differ, {context}"
    want = quantize_module._dequantize_ops(ops)
    assert restored.dtype == want.dtype and restored.stride() == want.stride(), context
    torch.testing.assert_close(restored, want, rtol=0, atol=0, equal_nan=True, msg=f"restored values differ, {context}")
    assert torch.equal(restored.signbit(), want.signbit()), f"signs differ, {context}"


def _both(x, bits=4, key=11):
    layout = tuple(x.shape), quantize_module._dense_strides(x)
    native = quantize_module._quantize_native(_native.kernels(), x, bits, key, *layout)
    return native, dequantize(native), quantize_module._quantize_ops(x, bits, key, *layout)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(1,), (8, 65537), (2, 3, 5, 7), "channels-last"])
def test_native_bf16_rounding_stores_the_bits_of_the_torch_ops(shape, threads, monkeypatch):
    """16-bit SR (stochastic rounding to bfloat16) in the C kernel and in torch ops: the same bits for
    fresh inputs with NaNs (also those whose noisy bits read as inf or wrap to zero), infinities, the
    largest floats, denormals and zeros of both signs; NaNs compared as NaNs (torch's conversions
    write 0x7FC0 or 0xFFFF, by kernel)."""
    monkeypatch.setattr(_native, "PARALLEL_MIN_ELEMENTS", 1)  # threads even for small ones
    x = torch.randn((2, 6, 5, 7) if shape == "channels-last" else shape) * 10.0 ** torch.randint(-30, 30, ()).item()
    specials = torch.tensor([0x7F800001, 0x7FFFFFFF, -1, 0x7FC00000, 0x7F800000, 0x7F7FFFFF, 1, -(1 << 31),
                             -0x7F800001], dtype=torch.int32).view(torch.float32)
    where = torch.randperm(x.numel())[: min(x.numel(), 3 * len(specials))]
    x.view(-1)[where] = specials[torch.randint(0, len(specials), where.shape)]
    if shape == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    key = torch.randint(-(1 << 62), 1 << 62, ())
    with torch_threads(threads):
        got = quantize_module.stochastic_round_bf16(x, key)
    monkeypatch.setattr(quantize_module, "_native_applies", lambda *args: False)
    want = quantize_module.stochastic_round_bf16(x, key)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.view(torch.int16)[~got.isnan()], want.view(torch.int16)[~want.isnan()])


@needs_kernels
def test_native_kernels_keep_non_finite_groups_as_the_torch_ops_do():
    """A NaN makes its group's offset and step NaN, an infinity its group's step infinite (an
    infinite group's step is inf - inf, NaN): those groups restore as non-finite, the others as usual."""
    x = torch.randn(2, 3, 16, 16)
    x[0, 1, 2, 5] = -float("nan")
    x[1, 2, 9, 0] = float("inf")
    x[1, 0, 0, 0] = -float("inf")
    x[0, 0, :4] = float("inf")  # a whole group
    native, restored, ops = _both(x)
    assert_same_storage(native, restored, ops)
    assert native.lo.isnan().sum() == 1 and native.scale.isinf().sum() == 2 and native.scale.isnan().sum() == 2
    assert (~restored.isfinite()).sum() == 4 * GROUP_SIZE


@needs_kernels
def test_a_restore_that_overflows_is_inf_in_both():
    """code * step overflows while lo + code * step would not: a fused multiply-add would round the
    sum of the exact product (finite); the product and the sum rounded apart give inf, in both."""
    x = torch.zeros(2, 64)
    x[:, 0] = -1.0035671368176115e38
    x[:, 1] = x[:, 0] + torch.finfo(torch.float32).max * 0.99999988
    native, restored, ops = _both(x, bits=2, key=9)
    assert_same_storage(native, restored, ops)
    assert restored[:, 1].isinf().all()


@needs_kernels
def test_zero_extremes_are_kept_as_plus_zero():
    """-0 and +0 tie in a minimum, and which one a reduction returns depends on its order: both codes
    keep +0 (relu(-0.0) is -0.0, so such groups occur in real networks)."""
    x = torch.zeros(4, 2 * GROUP_SIZE)
    x[0, 0] = x[1, 5] = x[2, GROUP_SIZE - 1] = -0.0
    x[3] = -0.0
    x[2, GROUP_SIZE:] = torch.rand(GROUP_SIZE)
    native, restored, ops = _both(x)
    assert_same_storage(native, restored, ops)
    assert not native.lo.signbit().any() and not native.scale.signbit().any()


@needs_kernels
def test_native_kernels_store_the_torch_ops_bits_on_a_cpu_without_vector_units():
    """torch's default (non-vectorised) kernels round as its AVX2 and AVX-512 kernels do for the ops
    quantize uses (no multiply-add a CPU may fuse or not): checked in a process that runs them."""
    script = (
        "import torch, test_xconv_quantize as t\n"
        "x = torch.randn(4, 16, 32, 32) + 1000\n"
        "for bits in (2, 4, 8):\n"
        "    native, restored, ops = t._both(x, bits, key=123)\n"
        "    t.assert_same_storage(native, restored, ops, f'bits {bits}')\n"
        "print('same')\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr[-2000:]


@needs_kernels
def test_quantize_runs_the_native_kernels_on_the_cpu(monkeypatch):
    calls, native = [], quantize_module._quantize_native
    monkeypatch.setattr(quantize_module, "_quantize_native", lambda *args: calls.append(args) or native(*args))
    quantize(torch.randn(2, 64), 4, key=3)
    assert len(calls) == 1


def test_an_int_key_is_taken_modulo_2_to_the_64():
    """Keys beyond int64 are their low 64 bits on every path (the C kernels take int64 tensors)."""
    x = torch.randn(2, 3, 8, 8)
    for wide, narrow in [(2**63, -(2**63)), (2**64 - 1, -1), (2**64 + 5, 5)]:
        assert torch.equal(quantize(x, 4, wide).codes, quantize(x, 4, narrow).codes)


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sr_custom_ops_pass_opcheck(bits):
    """The C kernels as custom ops (what compiled code calls): schema, fake outputs of the real ones'
    shapes, dtypes and strides (channels_last, padded groups), tracing, as ``torch.library.opcheck``
    checks them."""
    x = torch.randn(3, 5, 7, 9).contiguous(memory_format=torch.channels_last)
    key = torch.tensor(12345)
    torch.library.opcheck(quantize_module.sr_quantize, (x, bits, key))
    codes, lo, scale = quantize_module.sr_quantize(x, bits, key)
    torch.library.opcheck(quantize_module.sr_dequantize,
                          (codes, lo, scale, bits, list(x.shape), list(x.stride()), x.dtype))


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """:func:`xconv._native.kernels` loaded anew from an empty cache folder (returned), and forgotten after."""
    monkeypatch.setenv("XCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("XCONV_NATIVE", raising=False)
    _native.kernels.cache_clear()
    yield tmp_path
    _native.kernels.cache_clear()


@pytest.mark.parametrize("cc", ["no-such-compiler-xconv", 'gcc "'], ids=["missing", "malformed"])
def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(cc, fresh_kernels, monkeypatch):
    monkeypatch.setenv("CC", cc)
    with pytest.warns(RuntimeWarning, match="could not build its C kernels") as record:
        assert _native.kernels() is None
    x = torch.randn(3, 70)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.kernels() is None
        q = quantize(x, 4, key=5)
        mask = sign_bits(x, False)
    assert len(record) == 1 and torch.equal(dequantize(q), quantize_module._dequantize_ops(q))
    assert torch.equal(mask, pack_bits(x > 0))
    assert list(fresh_kernels.iterdir()) == []  # no partial file left behind


@needs_kernels
def test_a_cached_library_that_does_not_load_is_built_again(fresh_kernels):
    built = _native._build()
    built.write_bytes(b"")  # truncated
    assert _native.kernels() is not None and built.stat().st_size > 0


def test_xconv_native_0_turns_the_kernels_off(fresh_kernels, monkeypatch):
    monkeypatch.setenv("XCONV_NATIVE", "0")
    assert _native.kernels() is None


def test_constant_and_bf16_exact_groups_are_kept_exactly():
    x = torch.full((3, GROUP_SIZE), 0.375)
    assert torch.equal(dequantize(quantize(x, 2)), x)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 64), (4, 16, 8, 8)])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_stored_bytes_is_what_quantize_keeps(shape, bits):
    x = torch.randn(shape)
    assert quantize(x, bits).nbytes == stored_bytes(x.shape, bits)


def test_variance_falls_with_bits_as_predicted():
    """Per-element variance is scale^2 f (1 - f) with scale = range / (2^b - 1): 2 -> 4 bits divides
    it by (15 / 3)^2 = 25, 4 -> 8 bits by (255 / 15)^2 = 289 (f uniform in both)."""
    x = torch.randn(8, GROUP_SIZE * 8)
    var = {b: total_variance(torch.stack([dequantize(quantize(x, b)) for _ in range(400)])) for b in (2, 4, 8)}
    # 400 draws estimate each trace within a few per cent; f's distribution adds ~10%.
    assert 25 / 1.3 < var[2] / var[4] < 25 * 1.3
    assert 289 / 1.3 < var[4] / var[8] < 289 * 1.3


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_quantized_conv_keeps_the_packed_input_only(bits, channels_last):
    layer = xconv.XConv2d(16, 8, 3, padding=1, storage="quantized", bits=bits)
    x = torch.randn(4, 16, 12, 12, requires_grad=True)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    report = saved_tensor_bytes(layer, x, model=layer)
    assert report.total_bytes == stored_bytes(x.shape, bits)
    ref = nn.Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref.load_state_dict(layer.state_dict())
    y, y_ref = layer(x), ref(x)
    assert torch.equal(y, y_ref)
    grad_y = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), grad_y)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), grad_y)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert gw.stride() == layer.weight.stride()
    # The weight-gradient error sums D * (q(x) - x) over independent elements, so its expected
    # squared norm is the exact kernel applied to D^2 and the per-element variance of q(x).
    var_x = torch.stack([dequantize(quantize(x.detach(), bits)) for _ in range(300)]).var(0)
    predicted = torch.ops.aten.convolution_backward(
        grad_y.square(), var_x, layer.weight, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, (False, True, False)
    )[1].sum()
    errors = [(torch.autograd.grad(layer(x), layer.weight, grad_y)[0] - gw_ref).square().sum() for _ in range(8)]
    # 8 draws of a sum over 1152 weight entries: within ~5%; var_x from 300 draws: ~8%.
    assert 0.75 < torch.stack(errors).mean() / predicted < 1.3


def test_quantized_conv_under_bf16_autocast():
    layer = xconv.XConv2d(8, 8, 3, padding=1, storage="quantized", bits=4)
    ref = nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), ref(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(storage="quantized"), "bits must be one of 2, 4, 8, 16"),
        (dict(storage="quantized", bits=3), "bits must be one of 2, 4, 8, 16"),
        (dict(bits=True), "bits must be one of None, 2, 4, 8, 16"),
        (dict(storage="packed"), "storage must be one of"),
        (dict(storage="quantized", bits=4, mode="multi"), "mode is a sketch option"),
        (dict(storage="quantized", bits=4, deflation="dct"), "deflation is a sketch option"),
        (dict(max_compression=0), "max_compression must be None or an int >= 1"),
    ],
)
def test_bad_storage_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message) as err:
        xconv.XConv2d(4, 4, 3, **kwargs)
    assert "\n" not in str(err.value)


def test_max_compression_raises_the_probes_of_large_maps_only():
    layer = xconv.XConv2d(4, 4, 3, padding=1, probes=4, max_compression=16)
    small, large = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 32, 32)
    for x, probes in ((small, 4), (large, 64)):  # 64 / 16 = 4 < 4 probes; 1024 / 16 = 64
        report = saved_tensor_bytes(layer, x.requires_grad_(), model=layer)
        assert report.total_bytes == 2 * 4 * probes * 4 + 8  # sketch [B, C_in, r] in fp32 and the int64 probe seed


def test_a_sliced_channels_last_tensor_comes_back_channels_last():
    x = torch.randn(3, 6, 7, 9).to(memory_format=torch.channels_last)[:, ::2]
    restored = dequantize(quantize(x, 8))
    assert restored.is_contiguous(memory_format=torch.channels_last)
    assert (restored - x).abs().max() <= (x.max() - x.min()) / 255 * 1.01


@pytest.mark.parametrize("kwargs", [dict(storage="quantized", bits=4), dict(probes=8)], ids=["quantized", "sketch"])
def test_unbatched_input_runs_the_torch_layer(kwargs):
    layer = xconv.XConv2d(3, 4, 3, **kwargs)
    ref = nn.Conv2d(3, 4, 3)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, 8, requires_grad=True)
    assert not layer.uses_estimator(x)
    assert torch.equal(layer(x), ref(x))


def test_batchnorm_groups_do_not_mix_channels_of_different_scales():
    """A channels_last map whose channels differ in scale by 1000x: each channel keeps its own step,
    so the small channel's stored copy is as accurate as if it were alone."""
    x = torch.randn(4, 8, 16, 16) * torch.logspace(-3, 0, 8)[None, :, None, None]
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        error = (dequantize(quantize(xl, 4)) - xl)[:, 0].square().mean().sqrt() / xl[:, 0].square().mean().sqrt()
        assert error < 0.2


def test_tracers_modes_and_fake_tensors_see_the_custom_ops():
    """Eagerly xconv calls its ops' functions directly on plain tensors (the op's dispatch costs ~8 us);
    under a dispatch mode they stay ops: ``make_fx`` records ``xconv::sr_quantize``/``sr_dequantize``
    (whose graph then replays ``f`` on a new input), and ``FakeTensorMode`` with real inputs gets fake
    results from the ops' fake kernels (the C kernels writing through a fake tensor's pointer crashed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(t):
        return dequantize(quantize(t, 4, key=7))

    graph = make_fx(f)(torch.randn(2, 3, 8, 8))
    targets = {str(node.target) for node in graph.graph.nodes}
    assert {"xconv.sr_quantize.default", "xconv.sr_dequantize.default"} <= targets, targets
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(graph(x), f(x))
    with FakeTensorMode(allow_non_fake_inputs=True):
        stored = [quantize(torch.randn(2, 3, 16, 16), bits, key=3) for bits in (4, 16)]
        mask = sign_bits(torch.randn(2, 3, 8, 8), False)
        y = xconv.nn.BitReLU()(torch.randn(2, 3, 8, 8, requires_grad=True))
    assert all(type(t).__name__ == "FakeTensor" for t in [*stored[0].tensors(), stored[1].codes, mask, y])
