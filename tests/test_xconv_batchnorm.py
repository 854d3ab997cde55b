"""XBatchNorm against torch's BatchNorm on fresh random inputs.

Forward output and running statistics must be torch's bit for bit; the weight gradient an unbiased
estimate whose variance is the SR model's; the bias gradient exact; the input gradient biased
only by the derived ``-w s^3 dy Var(e) / N`` term; the bytes kept the quantized input and the two
statistics.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2
from torch import nn

from stats import FALSE_ALARM, bias_statistic, total_variance
from xconv.batchnorm import BATCHNORM_CLASSES, XBatchNorm1d, XBatchNorm2d
from xconv.memory import saved_tensor_bytes
from xconv.quantize import BITS, _group_size, _restore, _rows, dequantize, quantize, rounding_variance, stored_bytes

CL = {4: torch.channels_last, 5: torch.channels_last_3d}

# (id, torch class, input shape, constructor kwargs, channels_last, dtype)
CASES = [
    ("1d-BC", nn.BatchNorm1d, (8, 5), {}, False, torch.float32),
    ("1d-BCL", nn.BatchNorm1d, (4, 5, 7), {}, False, torch.float32),
    ("2d", nn.BatchNorm2d, (4, 3, 6, 5), {}, False, torch.float32),
    ("2d-momentum-None", nn.BatchNorm2d, (4, 3, 6, 5), dict(momentum=None), False, torch.float32),
    ("2d-no-running-stats", nn.BatchNorm2d, (4, 3, 6, 5), dict(track_running_stats=False), False, torch.float32),
    ("2d-affine-False", nn.BatchNorm2d, (4, 3, 6, 5), dict(affine=False), False, torch.float32),
    ("2d-channels-last", nn.BatchNorm2d, (4, 6, 5, 5), dict(momentum=0.3), True, torch.float32),
    ("2d-fp64", nn.BatchNorm2d, (4, 3, 6, 5), {}, False, torch.float64),
    ("3d", nn.BatchNorm3d, (2, 3, 3, 4, 4), dict(eps=1e-3), False, torch.float32),
    ("3d-channels-last", nn.BatchNorm3d, (2, 4, 3, 4, 4), dict(momentum=None), True, torch.float32),
]


def pair(base, channels, bits=8, dtype=torch.float32, **kwargs):
    """A torch layer with random affine parameters and its X layer with the same state."""
    ref = base(channels, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    layer = BATCHNORM_CLASSES[base](channels, dtype=dtype, bits=bits, **kwargs)
    layer.load_state_dict(ref.state_dict())
    return ref, layer


def fresh_input(shape, channels_last=False, dtype=torch.float32):
    x = (torch.randn(shape, dtype=dtype) * 2 + 1).requires_grad_()
    return x.detach().contiguous(memory_format=CL[x.dim()]).requires_grad_() if channels_last else x


def grads(module, x, y, grad_y):
    return torch.autograd.grad(y, [x, *module.parameters()], grad_y)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_running_stats_are_torch_s_bit_for_bit(case):
    _, base, shape, kwargs, channels_last, dtype = case
    ref, layer = pair(base, shape[1], bits=16, dtype=dtype, **kwargs)
    for step in range(4):
        if step == 3:  # eval: torch's forward, or batch statistics through the stored path
            ref.eval(), layer.eval()
        x = fresh_input(shape, channels_last, dtype)
        y_ref, y = ref(x), layer(x)
        stored = layer.training or not layer.track_running_stats
        assert (type(y.grad_fn).__name__ == "XBatchNormFunctionBackward") == stored
        assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
        for (name, a), b in zip(ref.state_dict().items(), layer.state_dict().values()):
            assert torch.equal(a, b), name
        grad_y = torch.randn_like(y_ref)
        g_ref, g = grads(ref, x, y_ref, grad_y), grads(layer, x, y, grad_y)
        assert g[0].stride() == g_ref[0].stride() and g[0].dtype == g_ref[0].dtype
        if ref.affine:
            assert torch.equal(g[2], g_ref[2])  # bias gradient: sum(dy), exact
        # 16-bit storage is SR bfloat16: each stored element is off by less than one ulp, 2^-7 of
        # its magnitude. The input gradient stays within 2^-6 relative (worst of 300 draws: 8e-4).
        assert rel_err(g[0], g_ref[0]) < 2**-6
        if ref.affine:
            # The weight gradient sum(dy * (x_q - mean) * invstd) can cancel to far less than its
            # terms (relative error up to 5e-2 seen), so it gets the hard bound of that ulp error:
            # |error| <= 2^-7 * invstd * sum(|dy| |x|), per channel (plus float slack).
            dims = [d for d in range(x.dim()) if d != 1]
            invstd = (x.detach().var(dims, unbiased=False) + layer.eps).rsqrt()
            bound = 2**-7 * invstd * (grad_y.abs() * x.detach().abs()).sum(dims)
            assert ((g[1] - g_ref[1]).abs() <= bound * 1.01 + 1e-6).all()


def test_plain_forward_without_grad_or_with_running_stats_in_eval():
    ref, layer = pair(nn.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(layer(x.requires_grad_()), ref(x))
    frozen = x.detach()
    layer.requires_grad_(False)
    assert layer(frozen).grad_fn is None
    layer.requires_grad_(True).eval()
    assert type(layer(x).grad_fn).__name__ == "NativeBatchNormBackward0"
    assert layer.uses_stored_input(x) is False


def test_one_value_per_channel_raises_like_torch():
    ref, layer = pair(nn.BatchNorm1d, 3)
    x = torch.randn(1, 3, requires_grad=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_behaves_as_torch(input_dtype):
    ref, layer = pair(nn.BatchNorm2d, 4, bits=16)
    x = fresh_input((4, 4, 5, 5)).detach().to(input_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), layer(x)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), layer.state_dict().values()))
    grad_y = torch.randn_like(y_ref)
    g_ref, g = grads(ref, x, y_ref, grad_y), grads(layer, x, y, grad_y)
    assert [t.dtype for t in g] == [t.dtype for t in g_ref]
    assert torch.equal(g[2], g_ref[2])
    for a, b in zip(g, g_ref):
        assert rel_err(a.float(), b.float()) < 2**-5  # bfloat16 input and 16-bit copy: 2^-8 each


def sr_variance(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element variance ``scale^2 f (1 - f)`` of :func:`quantize` at ``bits`` < 16 and its
    bound ``scale^2 / 4``."""
    q = quantize(x, bits)
    group = _group_size(_rows(x.shape)[1])
    bound = _restore(q.scale.float()[:, None].expand(-1, group).square() / 4, tuple(x.shape), x.stride(), torch.float32)
    return rounding_variance(x, bits).float(), bound


def batch_stats(x, eps):
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv_std = (x.var(dims, unbiased=False) + eps).rsqrt()
    return dims, shape, inv_std


def draws(layer, x, grad_y, wrt, count):
    return torch.stack([torch.autograd.grad(layer(x), wrt, grad_y)[0] for _ in range(count)])


def setup_2d(bits):
    ref, layer = pair(nn.BatchNorm2d, 6, bits=bits)
    x = fresh_input((8, 6, 6, 6))
    y = ref(x)
    # Partly aligned with the output, as a training loss's gradient often is: gamma's gradient
    # is then well away from zero, so a relative bias in it shows.
    grad_y = torch.randn_like(y) + 0.5 * y.detach()
    exact = grads(ref, x, y, grad_y)
    return ref, layer, x, grad_y, exact


@pytest.mark.parametrize("bits", BITS)
def test_weight_grad_unbiased_and_bias_grad_exact(bits):
    _, layer, x, grad_y, (_, gw, gb) = setup_2d(bits)
    samples = draws(layer, x, grad_y, layer.weight, 400)
    t, threshold = bias_statistic(samples, gw)
    assert t < threshold, f"T={t:.2f} > {threshold:.2f}"
    assert torch.equal(torch.autograd.grad(layer(x), layer.bias, grad_y)[0], gb)


def test_bias_statistic_rejects_batch_statistics_recomputed_from_the_copy():
    """A naive layer that normalizes the stored copy with its own mean and std: the SR noise
    inflates the std (by ~Var(e) / 2 var(x), ~5% at 2 bits), shrinking gamma's gradient."""
    _, layer, x, grad_y, (_, gw, _) = setup_2d(2)
    dims, shape, _ = batch_stats(x.detach(), layer.eps)
    samples = []
    for _ in range(100):
        x_q = dequantize(quantize(x.detach(), 2))
        x_hat = (x_q - x_q.mean(dims, keepdim=True)) * batch_stats(x_q, layer.eps)[2].view(shape)
        samples.append((grad_y * x_hat).sum(dims))
    t, threshold = bias_statistic(torch.stack(samples), gw)
    assert t > threshold


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_grad_variance_is_the_sr_model_s(bits):
    """gamma's gradient error is sum(dy * e * s) per channel, e independent per element:
    variance ``sum s^2 dy^2 Var(e)`` with ``Var(e) = scale^2 f (1 - f) <= scale^2 / 4`` and
    ``scale = range / (2^b - 1)``: the bound falls by ``((2^(b+1) - 1) / (2^b - 1))^2 ~ 4``
    per bit, and the variance with it (measured: 2 -> 4 bits ~27x, 4 -> 8 ~260x)."""
    _, layer, x, grad_y, _ = setup_2d(bits)
    dims, _, inv_std = batch_stats(x.detach(), layer.eps)
    count = 400
    samples = draws(layer, x, grad_y, layer.weight, count)
    var_e, bound_e = sr_variance(x, bits)
    per_channel = (grad_y**2 * var_e).sum(dims) * inv_std**2
    model, bound = per_channel.sum().item(), ((grad_y**2 * bound_e).sum(dims) * inv_std**2).sum().item()
    # Sum of independent per-channel sample variances: ~ model * chi2(nu) / nu (Satterthwaite),
    # 1.15 slack as in stats.py.
    nu = (count - 1) * model**2 / (per_channel**2).sum().item()
    low, high = chi2.ppf(FALSE_ALARM / 2, nu) / nu / 1.15, chi2.ppf(1 - FALSE_ALARM / 2, nu) / nu * 1.15
    measured = total_variance(samples)
    assert low < measured / model < high
    assert measured < bound * high


@pytest.mark.parametrize("bits", [2, 4])
def test_input_grad_bias_is_the_derived_term(bits):
    """dx_i = w s (dy_i - mean(dy) - xh_i mean(dy xh)), xh from the copy: the e_i in xh_i and in
    the mean meet, giving ``E[dx_i] - dx_i = -w s^3 dy_i Var(e_i) / N``. Few elements per channel
    (N = 16, one group per channel) make it visible: rejected against the exact gradient, accepted
    once added."""
    ref, layer = pair(nn.BatchNorm1d, 4, bits=bits)
    x = fresh_input((16, 4))
    y = ref(x)
    grad_y = torch.randn_like(y)
    gx = grads(ref, x, y, grad_y)[0]
    dims, shape, inv_std = batch_stats(x.detach(), ref.eps)
    var_e, bound_e = (v.t() for v in sr_variance(x.t(), bits))  # grouped per channel, along the batch
    n = x.numel() // x.shape[1]
    coefficient = (ref.weight.detach() * inv_std**3).view(shape) * grad_y / n
    predicted = -coefficient * var_e
    samples = draws(layer, x, grad_y, x, 2000)
    t, threshold = bias_statistic(samples, gx + predicted)
    assert t < threshold, f"T={t:.2f} > {threshold:.2f}"
    if bits == 2:  # 3-5% of the gradient here; 4 bits: ~0.2%, below what 2000 draws resolve
        assert bias_statistic(samples, gx)[0] > threshold
    # Var(e) <= scale^2 / 4 bounds it: ~0.7 / N of the gradient at 2 bits on Gaussian groups.
    assert predicted.norm() <= (coefficient * bound_e).norm()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_saved_bytes_are_the_quantized_input_and_statistics(bits, channels_last):
    ref, layer = pair(nn.BatchNorm2d, 6, bits=bits)
    x = fresh_input((4, 6, 7, 5), channels_last)
    statistics = 2 * 6 * 4  # fp32 mean and inverse std; the weight is a parameter
    assert saved_tensor_bytes(lambda: ref(x), model=ref).total_bytes == x.numel() * 4 + statistics
    assert saved_tensor_bytes(lambda: layer(x), model=layer).total_bytes == stored_bytes(x.shape, bits) + statistics


def test_double_backward_raises_naming_the_layer():
    _, layer = pair(nn.BatchNorm1d, 3)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="XBatchNorm1d does not support double backward"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize(
    "bits, error", [(3, ValueError), (32, ValueError), (None, TypeError), ("8", TypeError), (True, TypeError)]
)
def test_bad_bits_raise_one_line_errors(bits, error):
    with pytest.raises(error, match=r"^bits must be one of 2, 4, 8, 16; got .*$"):
        XBatchNorm2d(4, bits=bits)


def test_same_state_parameters_and_repr_as_torch():
    for base, cls in BATCHNORM_CLASSES.items():
        ref, layer = base(5, momentum=None, affine=False), cls(5, momentum=None, affine=False, bits=4)
        assert isinstance(layer, base)
        assert list(layer.state_dict()) == list(ref.state_dict())
        assert repr(layer) == repr(ref).replace(base.__name__, cls.__name__)[:-1] + ", bits=4)"
    assert XBatchNorm1d(3).bits == 8
