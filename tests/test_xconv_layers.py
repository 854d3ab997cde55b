"""XConv layer behaviour around the estimator: RNG, grad modes, dtypes, errors, 1-bit ReLUs."""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import xconv
import xconv._bits
from xconv.memory import cuda_peak_memory_bytes, peak_tensor_bytes, saved_tensor_bytes
from kernels import needs_kernels, torch_threads
from stats import bias_statistic

# An XConv layer saves its probe seed as an int64 tensor (so activation recomputation hands
# backward the seed that goes with its sketch).
SEED_BYTES = 8


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


@pytest.mark.parametrize("make", [
    lambda: xconv.XConv2d(4, 6, 3, padding=1),
    lambda: xconv.XConv2d(4, 6, 3, padding=1, bits=8),
    lambda: xconv.XConv2d(4, 6, 3, padding=1, storage="quantized", bits=4),
    lambda: xconv.batchnorm.XBatchNorm2d(4, bits=4),
], ids=["sketch", "sketch-8bit", "quantized", "batchnorm"])
def test_forward_leaves_the_generator_and_backward_takes_one_number(make):
    """The seed is derived from the default CPU generator's state without moving it (random ops
    after the layer draw as in the unconverted model); backward takes exactly one number, so the
    next step's seeds are new. The generator is never reseeded."""
    torch.manual_seed(7)
    initial = torch.initial_seed()
    layer = make()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    state = torch.get_rng_state()
    y = layer(x)
    assert torch.equal(torch.get_rng_state(), state)
    y.sum().backward()
    assert torch.initial_seed() == initial
    after_backward = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.randint(0, 2, (), dtype=torch.int64)
    assert torch.equal(torch.get_rng_state(), after_backward)


def test_dropout_between_converted_layers_draws_torch_s_masks_and_seeds_stay_distinct():
    """Train mode with dropout after each conv: the output bit for bit under one torch.manual_seed.
    The two convs derive their seeds from the generator states they see (counted where nothing
    draws between them), so every seed of a step differs, and the next step's differ again."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Dropout(0.5),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Dropout2d(0.3))
    model = xconv.convert(copy.deepcopy(plain), probes=4)
    x = torch.randn(2, 3, 16, 16)
    seeds = []
    for step in range(2):
        torch.manual_seed(step)
        want = plain(x)
        torch.manual_seed(step)
        got = model(x)
        assert torch.equal(got, want)
        got.sum().backward()
        seeds += [int(model[i].last_seed) for i in (0, 1, 3)]
    assert len(set(seeds)) == len(seeds)


def test_no_grad_keeps_no_sketch_and_matches_torch():
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=8)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert not layer.uses_estimator(x)
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)



@pytest.mark.parametrize("options", [dict(probes=4), dict(probes=4, per_sample=True), dict(probes=4, mode="multi"),
                                     dict(storage="quantized", bits=4)],
                         ids=["sketch", "per-sample", "multi", "quantized"])
@pytest.mark.parametrize("torch_class", [nn.Conv2d, nn.ConvTranspose2d], ids=["conv", "transposed"])
def test_an_empty_batch_runs_as_torch_s_layer(options, torch_class):
    """Batch size 0 (an empty last batch, a filtered one): output and gradients are the torch layer's."""
    ref = torch_class(3, 4, 3, padding=1)
    layer = xconv.convert(copy.deepcopy(ref), **options)
    outs, grads = [], []
    for module in (ref, layer):
        x = torch.randn(0, 3, 8, 8, requires_grad=True)
        y = module(x)
        y.sum().backward()
        outs.append(y)
        grads.append((x.grad, module.weight.grad, module.bias.grad))
    assert outs[1].shape == outs[0].shape
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.equal(got, want)

def test_saved_bytes_are_the_sketch():
    layer = xconv.XConv2d(16, 16, 3, padding=1, probes=8, bias=False)
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    report = saved_tensor_bytes(layer, x)
    assert report.total_bytes == 4 * 16 * 8 * 4 + SEED_BYTES  # [B, C_in, r] fp32 and the int64 seed; the weight is a parameter
    exact = saved_tensor_bytes(nn.Conv2d(16, 16, 3, padding=1, bias=False), x)
    assert exact.total_bytes == x.numel() * 4


def test_multi_mode_sketch_is_batch_by_probes():
    layer = xconv.XConv2d(16, 16, 3, padding=1, probes=8, mode="gaussian", bias=False)
    assert layer.sketch_config.mode == "multi"
    report = saved_tensor_bytes(layer, torch.randn(4, 16, 32, 32, requires_grad=True))
    assert report.total_bytes == 4 * 8 * 4 + SEED_BYTES


@pytest.mark.parametrize("options", [{}, dict(storage="quantized", bits=4)], ids=["sketch", "quantized"])
def test_double_backward_raises_naming_the_layer(options):
    layer = xconv.XConv2d(2, 2, 3, padding=1, **options)
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"XConv2d \(weight \[2, 2, 3, 3\].*\) does not support double backward .*exclude="):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)


def test_gradient_penalty_at_probes_zero_is_torch_s():
    """probes=0 promises exact gradients: a gradient penalty (WGAN-GP / R1: backward through an input
    gradient) through converted convs and 1-bit (leaky) ReLUs equals the torch model's."""
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3)).double()
    model = xconv.convert(copy.deepcopy(ref), probes=0)
    assert isinstance(model[1], xconv.BitReLU) and isinstance(model[3], xconv.BitLeakyReLU)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    grads = []
    for net in (ref, model):
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        penalty = (gx.flatten(1).norm(dim=1) - 1).pow(2).mean()
        grads.append(torch.autograd.grad(penalty, list(net.parameters()), materialize_grads=True))
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [xconv.BitReLU, lambda inplace: xconv.BitLeakyReLU(0.1, inplace)],
                         ids=["relu", "leaky"])
@pytest.mark.parametrize("inplace", [False, True])
def test_bit_activation_double_backward_gradgradcheck(make, inplace):
    act = make(inplace=inplace)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x = (x + x.sign() * 0.1).requires_grad_(True)  # away from the kink, where finite differences hold
    assert torch.autograd.gradgradcheck(lambda t: act(t.clone()) * t, (x,))


@pytest.mark.parametrize("mode, use_reentrant, preserve_rng_state", [
    ("independent", False, True), ("independent", False, False), ("multi", False, True),
    ("multi", False, False), ("independent", True, False), ("independent", True, True),
])
def test_checkpoint_recomputation_keeps_the_estimate_unbiased(mode, use_reentrant, preserve_rng_state):
    """Activation recomputation re-runs forward in backward; with preserve_rng_state=False it draws
    another seed, which must come with its own sketch. A reentrant checkpoint with
    preserve_rng_state=True runs forward under no_grad (no draw) and sets the generator back before
    each recomputation: the backward's draw (outside the recomputation) moves it on between steps."""
    ref = nn.Conv2d(4, 6, 3, padding=1)
    layer = xconv.XConv2d(4, 6, 3, padding=1, probes=4, mode=mode)
    layer.load_state_dict(ref.state_dict())
    # requires grad: a reentrant checkpoint gives no gradients otherwise
    x, grad_y = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 6, 6, 6)
    (exact,) = torch.autograd.grad(ref(x), ref.weight, grad_y)

    def draw():
        layer.weight.grad = None
        # .backward(): a reentrant checkpoint does not support autograd.grad
        checkpoint(layer, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state).backward(grad_y)
        return layer.weight.grad

    t, threshold = bias_statistic(torch.stack([draw() for _ in range(400)]), exact)
    assert t < threshold, f"Monte-Carlo mean deviates from the exact gradient: T={t:.2f} > {threshold:.2f}"


def test_a_replayed_rng_state_is_named_by_a_warning():
    """torch.manual_seed with one seed before every step repeats one estimate: the first layer says
    so at the third repeat (once: the layers after it repeat alike). Plain training and every
    activation-recomputation form draw fresh seeds and stay silent."""
    x = torch.randn(2, 4, 6, 6, requires_grad=True)

    def steps(reseed=False, **kwargs):
        layer = xconv.convert(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)), probes=4)
        grads = []
        for _ in range(3):
            if reseed:
                torch.manual_seed(0)
            layer.zero_grad(set_to_none=True)
            (checkpoint(layer, x, **kwargs) if kwargs else layer(x)).sum().backward()
            grads.append(layer[0].weight.grad)
        return grads

    with pytest.warns(RuntimeWarning, match=r"^'0' \(XConv2d, .*\) drew the same seed in three forwards in a row") as record:
        first, _, third = steps(reseed=True)
    assert torch.equal(first, third) and len(record) == 1
    for kwargs in ({}, *(dict(use_reentrant=r, preserve_rng_state=p) for r in (False, True) for p in (False, True))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            first, _, third = steps(**kwargs)
        assert not torch.equal(first, third)


def _relative_error(estimate, reference):
    return ((estimate.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contraction", ["probes", "decompress"])
def test_autocast_estimate_is_the_fp32_estimate_up_to_rounding(dtype, contraction):
    # Under autocast the layer computes in the half dtype; with the same probes (same seed)
    # its weight gradient may differ from the fp32 estimate only by rounding. The rounding
    # floor is measured, not assumed: the exact conv's own half-vs-fp32 gradient error on the
    # same data. Different probes would differ by ~sqrt(2)x the estimator's error (>> 1).
    ref = nn.Conv2d(16, 16, 3, padding=1)
    layer = xconv.XConv2d(16, 16, 3, padding=1, probes=8, contraction=contraction)
    layer.load_state_dict(ref.state_dict())
    x, grad_y = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    exact32 = _weight_grad(ref, x, grad_y)
    with torch.autocast("cpu", dtype=dtype):
        y_ref = ref(x)
    exact_half = torch.autograd.grad(y_ref, ref.weight, grad_y.to(dtype))[0]
    floor = _relative_error(exact_half, exact32)
    torch.manual_seed(3)
    estimate32 = _weight_grad(layer, x, grad_y)
    saved = []
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=dtype), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.dtype) or t, lambda t: t
    ):
        y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref)
    estimate_half = torch.autograd.grad(y, layer.weight, grad_y.to(dtype))[0]
    assert estimate_half.dtype == torch.float32  # the parameter's dtype, as with torch's conv
    # the weight (cast) and the sketch, both in the compute dtype, and the probe seed
    assert saved == [dtype, torch.int64, dtype]
    assert 0 < floor < 0.05
    assert _relative_error(estimate_half, estimate32) < 4 * floor


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("options", [dict(contraction="probes"), dict(contraction="decompress"),
                                     dict(per_sample=True), dict(deflation="pca", deflation_rank=2)])
def test_channels_last_layout_is_kept(transposed, options):
    # channels_last in, channels_last out, and the same for every gradient, as torch's conv does.
    if transposed:
        ref = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        layer = xconv.XConvTranspose2d(8, 6, 4, stride=2, padding=1, probes=4, **options)
    else:
        ref = nn.Conv2d(8, 6, 3, padding=1)
        layer = xconv.XConv2d(8, 6, 3, padding=1, probes=4, **options)
    layer.load_state_dict(ref.state_dict())
    layer.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, ref(x))
    out.backward(torch.randn_like(out))
    for tensor in (out, x.grad, layer.weight.grad):
        assert tensor.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("contraction", ["probes", "decompress"])
def test_weight_grad_has_the_weight_strides(kernel_size, contraction):
    # Strides of size-1 dims too: DDP compares them with its gradient buckets.
    layer = xconv.XConv2d(4, 8, kernel_size, probes=2, contraction=contraction)
    layer(torch.randn(2, 4, 16, 16)).sum().backward()
    assert layer.weight.grad.stride() == layer.weight.stride()


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
@pytest.mark.parametrize("chunk", [None, 400], ids=["one-chunk", "chunks-of-samples"])
def test_bit_activation_matches_torch(make, inplace, chunk, monkeypatch):
    if chunk is not None:  # 400 elements: one 315-element sample at a time
        monkeypatch.setattr(xconv._bits, "SIGN_CHUNK_ELEMENTS", chunk)
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


@pytest.mark.parametrize("shape", [(), (7,), (0, 4), (2, 3, 4, 5, 6), "channels_last"])
def test_bit_relu_gradient_on_any_shape_and_layout(shape):
    if shape == "channels_last":
        x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape)
    grad = torch.randn_like(x)
    if grad.numel():  # at x <= 0 ReLU's gradient is 0 even for a NaN upstream; leaky ReLU's is NaN
        x[(0,) * x.dim()], grad[(0,) * grad.dim()] = -1.0, float("nan")
    if x.numel() > 1:  # at x = NaN ReLU passes the gradient, leaky ReLU scales it
        x[tuple(int(i) for i in torch.unravel_index(torch.tensor(1), x.shape))] = float("nan")
    pairs = [(nn.ReLU(), xconv.BitReLU()), (nn.LeakyReLU(0.2), xconv.BitLeakyReLU(0.2)),
             (nn.LeakyReLU(0.0), xconv.BitLeakyReLU(0.0))]  # leaky at slope 0 is not ReLU: -0.0, NaN
    for ref, bit in pairs:
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        outs = [ref(leaves[0]), bit(leaves[1])]
        for out, leaf in zip(outs, leaves):
            out.backward(grad)
        assert torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0))
        assert torch.equal(outs[0].signbit(), outs[1].signbit())
        assert torch.equal(leaves[0].grad.nan_to_num(7.0), leaves[1].grad.nan_to_num(7.0))


def test_bias_gradient_in_double_precision_is_torch_s():
    ref = nn.Conv1d(3, 5, 3).double()
    layer = xconv.XConv1d(3, 5, 3, probes=2).double()
    layer.load_state_dict(ref.state_dict())
    x, grad = torch.randn(2, 3, 32, dtype=torch.float64), torch.randn(2, 5, 30, dtype=torch.float64)
    ref(x).backward(grad)
    layer(x).backward(grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


def test_bit_relu_keeps_one_bit_per_element():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    fp32 = saved_tensor_bytes(nn.ReLU(), x * 1.0).total_bytes
    bit = saved_tensor_bytes(xconv.BitReLU(), x * 1.0).total_bytes
    assert fp32 == x.numel() * 4
    assert bit * 32 == fp32


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("numel", [1, 8, 945, 4096 + 5])
@pytest.mark.parametrize("negative_slope", [None, 0.2, 0.0], ids=["relu", "leaky", "leaky-0"])
def test_native_sign_kernels_compute_the_torch_ops_bits(negative_slope, numel, threads, monkeypatch):
    """The C kernels of the 1-bit (leaky) ReLU (contiguous fp32 CPU tensors) keep the mask bits and
    return the input gradient bits of the torch-op code, on fresh inputs with zeros of both signs,
    infinities, quiet and signalling NaNs (aten's leaky backward quiets a passed-on one) and
    denormals, any length (a last partial mask byte), split across threads or not."""
    from xconv._bits import sign_bits, sign_bits_backward

    assert xconv._native.kernels() is not None, "xconv's C kernels did not build"
    monkeypatch.setattr(xconv._native, "PARALLEL_MIN_ELEMENTS", 1)  # threads even for small tensors
    x, grad = torch.randn(numel), torch.randn(numel) * 10.0 ** torch.randint(-30, 30, ()).item()
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-40, -1e-45])
    specials = torch.cat([specials, torch.tensor([0x7F800001, -0x7F800001], dtype=torch.int32).view(torch.float32)])
    for tensor in (x, grad):
        where = torch.randperm(numel)[: min(numel, 24)]
        tensor[where] = specials[torch.randint(0, len(specials), where.shape)]
    leaky = negative_slope is not None
    with torch_threads(threads):
        packed = sign_bits(x, leaky)
        grad_x = sign_bits_backward(grad, packed, negative_slope)
    monkeypatch.setattr(xconv._native, "kernels_for", lambda tensor: None)  # the torch-op code
    want = sign_bits(x, leaky)
    assert torch.equal(packed, want)
    want_x = sign_bits_backward(grad, want, negative_slope)
    # NaNs as NaNs: aten's leaky backward quiets a passed-on signalling NaN in its vectorised body and
    # not in its scalar tail (the kernel always does, as a product by one)
    assert torch.equal(grad_x.isnan(), want_x.isnan())
    assert torch.equal(grad_x.view(torch.int32)[~grad_x.isnan()], want_x.view(torch.int32)[~want_x.isnan()])


@needs_kernels
def test_native_kernels_on_pool_threads_keep_the_callers_flush_denormal_mode(monkeypatch):
    """torch.set_flush_denormal sets a per-thread mode: the C kernels' pool threads, started before it
    was set, compute in the calling thread's mode, as torch's own kernels do (denormal leaky-ReLU
    gradients flushed to zero, passed on or scaled)."""
    from xconv._bits import sign_bits, sign_bits_backward

    monkeypatch.setattr(xconv._native, "PARALLEL_MIN_ELEMENTS", 1)
    # denormal, passed on (x > 0) or times 0.01; a multiple of the vector width: aten's scalar tail
    # passes a gradient on without flushing it, its vectorised body (and the kernel) flush
    x, grad = torch.randn(4096), -torch.rand(4096) * 1e-38
    with torch_threads(3):
        packed = sign_bits(x, True)  # starts the pool's threads
        if not torch.set_flush_denormal(True):
            pytest.skip("torch has no flush-denormal mode on this CPU")
        try:
            got = sign_bits_backward(grad, packed, 0.01)
            want = torch.ops.aten.leaky_relu_backward(grad, x, 0.01, False)
        finally:
            torch.set_flush_denormal(False)
    assert (want == 0).all()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_pack_bits_roundtrip_odd_length():
    mask = torch.rand(3, 7, 5) > 0.5
    packed = xconv._bits.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(xconv._bits.unpack_bits(packed, mask.shape), mask)
    # any window, in any dtype: the backward unpacks a few samples at a time into the gradient's
    flat = mask.flatten()
    for start, count in [(0, 8), (3, 17), (13, 5), (100, 5)]:
        window = xconv._bits.unpack_bits(packed, (count,), torch.bfloat16, start=start)
        assert window.dtype == torch.bfloat16
        assert torch.equal(window, flat[start : start + count].to(torch.bfloat16))


def test_peak_tensor_bytes_counts_live_storages():
    def fn():
        a = torch.ones(2**18)  # 1 MiB
        b = torch.ones(2**18) * 2  # 2 MiB at once (ones + product), 1 MiB after
        del a
        return b.sum()

    assert peak_tensor_bytes(fn) == 3 * 2**20


def test_peak_tensor_bytes_does_not_count_views_of_inputs():
    x = torch.ones(2**18)  # 1 MiB, made before the call

    def fn():
        y = x.detach().view(64, -1)  # shares x's storage
        y.mul_(1.0)
        return y.t().sum(0)  # 64 floats of new memory

    assert peak_tensor_bytes(fn) == 64 * 4


def test_saved_bytes_by_module():
    model = nn.Sequential(xconv.XConv2d(4, 8, 3, padding=1, probes=4), xconv.BitReLU())
    x = torch.randn(2, 4, 16, 16)
    report = saved_tensor_bytes(lambda: model(x).sum(), model=model)
    assert report.by_module == {"0": 2 * 4 * 4 * 4 + SEED_BYTES, "1": 2 * 8 * 16 * 16 // 8}


def test_saved_bytes_frees_the_graph_with_the_report():
    # The graph holds the pack hook and what it packed; a hook that reached the result, or a
    # saved output (ReLU's) packed with its grad_fn, would keep the graph alive for good (a
    # cycle through C++), one leaked forward per measurement.
    model = nn.Sequential(xconv.XConv2d(4, 8, 3, padding=1, probes=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    outputs = []
    model[1].register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    report = saved_tensor_bytes(lambda: model(x).sum(), model=model)
    result = weakref.ref(report.result)
    del report
    gc.collect()
    assert result() is None and outputs[0]() is None
    # What was packed still serves backward (backward itself frees the graph, so apart).
    torch.manual_seed(0)
    saved_tensor_bytes(lambda: model(x).sum(), model=model).result.backward()
    torch.manual_seed(0)
    torch.testing.assert_close(x.grad, torch.autograd.grad(model(x).sum(), x)[0])


@pytest.mark.parametrize("probes", [0, 4])
def test_saved_bytes_under_autocast_count_activations_not_weight_casts(probes):
    # Autocast keeps bf16 copies of the weights for backward; they are weight-sized, not
    # activations. What is left: the bf16 input (exact) or the bf16 sketch (XConv).
    layer = xconv.XConv2d(4, 8, 3, padding=1, probes=probes)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = saved_tensor_bytes(lambda: layer(x).sum())
    assert report.total_bytes == (2 * 2 * 4 * probes + SEED_BYTES if probes else 2 * x.numel())


def test_cuda_peak_is_none_for_a_cpu_run_on_a_gpu_machine(monkeypatch):
    # A CPU run (trainer.accelerator=cpu) on a machine with a GPU: nothing to measure, and no CUDA call.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    assert cuda_peak_memory_bytes(calls.append, 1, device=torch.device("cpu")) is None
    assert cuda_peak_memory_bytes(calls.append, 1, device="cpu") is None
    assert calls == []


@pytest.mark.parametrize("options, spreads", [
    (dict(mode="multi"), True), (dict(mode="orthogonal"), True),
    (dict(mode="independent"), False), (dict(storage="quantized", bits=4), False),
    (dict(deflation="pca", deflation_rank=2), True),
], ids=["multi", "orthogonal", "independent", "quantized", "pca"])
def test_non_finite_input_pixel_spread_and_anomaly_warning(options, spreads):
    """One NaN input pixel: torch's layer gets NaN in that input channel's weight-gradient entries;
    the per-channel sketch and SR storage alike, the multi-channel sketches and the PCA-deflated one
    (its basis spans every channel) in every entry. Under
    anomaly detection the layer says so, naming itself; outside it, nothing is checked."""
    ref = nn.Conv2d(3, 4, 3, padding=1)
    layer = xconv.XConv2d(3, 4, 3, padding=1, probes=8, **options)
    x = torch.randn(2, 3, 8, 8)
    x[0, 1, 3, 3] = float("nan")
    ref(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no check, no warning outside anomaly mode
        layer(x).sum().backward()
    expected = torch.ones_like(ref.weight.grad, dtype=torch.bool) if spreads else ref.weight.grad.isnan()
    assert torch.equal(layer.weight.grad.isnan(), expected)
    with torch.autograd.set_detect_anomaly(True), pytest.warns(RuntimeWarning) as record:
        layer(x)
    message = str(record[0].message)
    assert message.startswith("XConv2d (weight [4, 3, 3, 3]") and "non-finite input [2, 3, 8, 8]" in message
    assert ("every weight-gradient entry" in message) == spreads


def test_torch_func_transforms_are_refused_in_one_line():
    """The estimators are torch.autograd Functions with a seed read from the generator's state, which
    torch.func's transforms do not give: the error says so instead of a storage error."""
    layer = xconv.XConv2d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 6, 6)

    def loss(weight):
        return torch.func.functional_call(layer, {"weight": weight, "bias": layer.bias}, (x,)).sum()

    with pytest.raises(RuntimeError, match=r"^XConv layers cannot read torch's generator state here \(inside a torch.func"):
        torch.func.grad(loss)(layer.weight.detach())
