"""The autograd Functions of the XConv layers and the helpers every xconv Function shares.

:class:`XConvFunction` keeps a sketch of its input (paper section 3); :class:`QuantizedConvFunction`
keeps its input in SR low-bit storage (:mod:`xconv.quantize`). Both return the exact output,
input gradient and bias gradient.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from . import rng
from ._contraction import independent_weight_grad, multi_weight_grad
from ._cost import choose_contraction
from ._geometry import ConvGeometry
from ._kernels import bias_grad, conv_backward, input_grad
from ._options import SketchConfig, layer_probes
from ._sketch import SKETCH_BITS_STREAM, ChunkPlan, deflation_basis, sketch_input
from .probes import dct_basis
from .quantize import dequantize, quantize


class XConvFunction(torch.autograd.Function):
    """Convolution whose backward estimates ``dL/dW`` from a sketch of the input.

    Forward returns exactly ``aten.convolution(x, weight, bias, ...)`` and keeps only the
    weight, the sketch (``[B, C_in, r]`` or ``[B, r]``; with ``bits``, in SR low-bit storage),
    the seed (an int64 scalar tensor, :func:`xconv.rng.draw_seed`) and, with ``deflation="pca"``,
    the deflation basis (``[k, n]``). Backward
    returns the exact input and bias gradients and an unbiased estimate of the weight
    gradient (Hutchinson trace estimation; paper section 3).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geom: ConvGeometry, cfg: SketchConfig, seed: torch.Tensor, layer: str):
        y = torch.ops.aten.convolution(x, weight, bias, *geom.conv_args())
        ctx.geom, ctx.cfg, ctx.layer = geom, cfg, layer
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        ctx.plan = ctx.stored = None
        sketch = stored_basis = None
        if ctx.needs_input_grad[1]:
            if cfg.mode != "independent":
                ctx.plan = ChunkPlan.make(cfg, x.shape[1], math.prod(x.shape[2:]), geom.groups, y[0].numel())
            basis = deflation_basis(x, cfg, seed)
            sketch = sketch_input(x.detach(), cfg, seed, ctx.plan, basis)
            ctx.order = choose_contraction(cfg, x.shape, y.shape, weight.shape, geom)
            # The DCT basis is a cached function of the shape; only the data-adaptive one is kept.
            stored_basis = basis if cfg.deflation == "pca" else None
        kept = (sketch,)
        if sketch is not None and cfg.bits is not None:
            stored = quantize(sketch, cfg.bits, rng.key(seed, SKETCH_BITS_STREAM))
            ctx.stored, kept = stored.layout(), stored.tensors()
        # The seed is a saved tensor, not a ctx attribute: activation recomputation
        # (torch.utils.checkpoint) replaces saved tensors by the recomputed forward's, and a
        # recomputation that draws another seed (preserve_rng_state=False) must hand backward
        # that seed with its sketch, or the probes no longer match and the estimate is biased.
        ctx.save_for_backward(weight, stored_basis, seed, *kept)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        refuse_double_backward(ctx.layer, "a sketch of its input")
        rng.advance()
        weight, basis, seed, *stored = ctx.saved_tensors
        sketch = stored[0] if ctx.stored is None else dequantize(ctx.stored.with_tensors(*stored))
        geom, cfg = ctx.geom, ctx.cfg
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad_y, ctx.x_shape, weight, geom)
        if ctx.needs_input_grad[1]:
            if cfg.mode == "independent":
                if cfg.deflation == "dct":
                    basis = dct_basis(tuple(ctx.x_shape[2:]), cfg.rank, grad_y.device)
                grad_w = independent_weight_grad(
                    grad_y, sketch, cfg, seed, ctx.x_shape, weight, geom, ctx.order, basis
                )
            else:
                grad_w = multi_weight_grad(grad_y, sketch, cfg, seed, ctx.plan, ctx.x_shape, weight.shape, geom)
            grad_w = parameter_layout(grad_w, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = bias_grad(grad_y)
        return grad_x, grad_w, grad_b, None, None, None, None


class QuantizedConvFunction(torch.autograd.Function):
    """``aten.convolution`` whose backward computes ``dL/dW`` from an SR ``bits``-bit copy of the input.

    The alternative to the paper's sketch at equal bytes (``shared/design/storage.md``): the input is
    stochastically rounded (:mod:`xconv.quantize`), so the copy is unbiased, and backward hands the
    dequantized copy to the exact weight-gradient kernel: every geometry, padding mode, group count
    and transposed conv is exact in structure, and the estimate's variance falls ~4x per stored bit.
    Keeps: the weight, the packed codes (``bits / 8`` bytes per input element) and two bfloat16
    numbers per group of :data:`xconv.quantize.GROUP_SIZE` elements.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geom: ConvGeometry, bits: int, seed: torch.Tensor, layer: str):
        y = torch.ops.aten.convolution(x, weight, bias, *geom.conv_args())
        ctx.geom, ctx.x_shape, ctx.has_bias, ctx.layer, ctx.bits = geom, x.shape, bias is not None, layer, bits
        stored = quantize(x, bits, seed) if ctx.needs_input_grad[1] else None
        ctx.stored = None if stored is None else stored.layout()
        ctx.save_for_backward(weight, *(() if stored is None else stored.tensors()))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, *stored = ctx.saved_tensors
        refuse_double_backward(ctx.layer, f"its input in {ctx.bits}-bit SR storage")
        rng.advance()
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        needs_b = needs_b and ctx.has_bias
        if needs_w:  # all three from the restored input in one call, as the torch layer's backward
            x_hat = dequantize(ctx.stored.with_tensors(*stored))
            grad_x, grad_w, grad_b = conv_backward(grad_y, x_hat, weight, ctx.geom, (needs_x, True, needs_b))
            return grad_x, parameter_layout(grad_w, weight), grad_b, None, None, None, None
        grad_x = input_grad(grad_y, ctx.x_shape, weight, ctx.geom) if needs_x else None
        grad_b = bias_grad(grad_y) if needs_b else None
        return grad_x, None, grad_b, None, None, None, None


def estimate(x, weight, bias, geom: ConvGeometry, cfg: SketchConfig, seed: torch.Tensor, layer: str) -> torch.Tensor:
    """``aten.convolution(x, weight, bias, *geom.conv_args())`` by the Function ``cfg`` asks for, with the
    probe count :func:`xconv._options.layer_probes` gives ``x``; ``layer`` names the call in errors and
    warnings. Traceable by ``torch.compile`` (the seed is a tensor and the probes are counter-based,
    :mod:`xconv.rng`); anomaly mode's check runs eagerly only."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Cast as autocast would for a conv, then run the Function without autocast so probes and
        # sketch live in the compute dtype.
        dtype = torch.get_autocast_dtype(device)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _apply(x, weight, bias, geom, cfg, seed, layer)
    return _apply(x, weight, bias, geom, cfg, seed, layer)


def _apply(x, weight, bias, geom, cfg, seed, layer):
    if not torch.compiler.is_compiling() and torch.is_anomaly_enabled():
        _warn_if_not_finite(x, cfg, layer)  # after autocast's cast: what the sketch is made of
    if x.numel() == 0:  # an empty batch keeps nothing: torch's conv, whose gradients are exact (zeros)
        return torch.ops.aten.convolution(x, weight, bias, *geom.conv_args())
    if cfg.storage == "quantized":
        return QuantizedConvFunction.apply(x, weight, bias, geom, cfg.bits, seed, layer)
    probes = layer_probes(cfg, x.shape)
    if probes != cfg.probes:
        cfg = dataclasses.replace(cfg, probes=probes)
    return XConvFunction.apply(x, weight, bias, geom, cfg, seed, layer)


def _warn_if_not_finite(x: torch.Tensor, cfg: SketchConfig, layer: str) -> None:
    """Under torch's anomaly detection (``torch.autograd.set_detect_anomaly(True)``, Lightning's
    ``Trainer(detect_anomaly=True)``), warn naming ``layer`` when its input is not finite: that is
    where a NaN in the weight gradients starts, and in the multi-channel modes it spreads further
    than in torch's layer. Costs one pass over the input and a host sync, so only in that mode."""
    if torch.isfinite(x).all():
        return
    mixes_channels = cfg.mode != "independent" or cfg.deflation == "pca"  # the PCA basis spans all channels
    spread = ("every weight-gradient entry of this layer" if cfg.storage == "sketch" and mixes_channels
              else "the weight-gradient entries of the affected input channels, as in torch's layer")
    kept = "its sketch" if cfg.storage == "sketch" else "its quantized copy"
    warnings.warn(f"{layer}: non-finite input {list(x.shape)}: {kept} is not finite, and so will be {spread}",
                  RuntimeWarning, stacklevel=2)


def parameter_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``param``'s dtype and exact strides (size-1 dims included): DDP's gradient
    buckets expect them and otherwise copy and warn on every step."""
    grad = grad.to(param.dtype)
    if grad.stride() != param.stride():
        grad = torch.empty_like(param).copy_(grad)
    return grad


def layer_label(module: torch.nn.Module, detail: str = "") -> str:
    """How errors and warnings name an xconv layer: its name in the model where :func:`xconv.convert`
    made it (``"'encoder.conv1' (XConv2d, weight [64, 3, 7, 7])"``), else its class, with ``detail``."""
    what = type(module).__name__ + (f", {detail}" if detail else "")
    name = module.__dict__.get("xconv_name")
    return f"{name!r} ({what})" if name is not None else (f"{type(module).__name__} ({detail})" if detail else what)


def refuse_double_backward(layer: str, kept: str) -> None:
    """Raise a one-line ``RuntimeError`` naming ``layer`` if this backward runs with ``create_graph=True``:
    what it ``kept`` (e.g. "its input in 4-bit SR storage") cannot give higher-order gradients."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{layer} does not support double backward (it keeps {kept}); keep it a torch "
                           "layer for higher-order gradients (xconv.convert(..., exclude=[its name]) or xconv.revert)")
