"""The weight-gradient estimate from the sketch: ``dW[o, i, k] = sum_b sum_j A[b, o, j, k] S[b, i, j]``.

Independent mode contracts ``D`` with the unfolded probes and then with the sketch (``"probes"``)
or rebuilds ``Z S`` and calls the exact kernel (``"decompress"``); multi-channel modes lift ``D``
by the sketch and call the exact kernel per probe block (``shared/design/estimator.md``, section 2).
"""
from __future__ import annotations

import math

import torch

from . import _cost
from ._geometry import ConvGeometry
from ._kernels import weight_grad
from ._options import SketchConfig
from ._sketch import independent_probes

def _probe_taps(z: torch.Tensor, taps, geom: ConvGeometry) -> torch.Tensor:
    """``Phi_k z`` for every tap ``k`` (``Phi_k^T z`` for a transposed conv).

    Args:
        z: ``[R, *S_in]`` probe images.
    Returns:
        ``[R, |K|, p]``, contiguous, where ``p`` is the number of output pixels (those of ``D``):
        im2col of the probes. For a convolution each tap is a strided slice of the
        zero-padded probes (all taps one copy, no arithmetic); for a transposed convolution it is a
        transposed convolution with a one-hot kernel, so stride, padding, dilation and output
        padding mean exactly what they mean in torch.
    """
    stride, padding, dilation, transposed, out_pad, _ = geom.conv_args()
    if transposed:
        k = math.prod(taps)
        onehot = torch.eye(k, dtype=z.dtype, device=z.device).view(1, k, *taps)
        u = torch.ops.aten.convolution(z.unsqueeze(1), onehot, None, stride, padding, dilation, True, out_pad, 1)
        return u.flatten(2)
    pad = [p for p in reversed(padding) for _ in range(2)]
    zp = torch.nn.functional.pad(z, pad) if any(pad) else z.contiguous()
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(z.shape[1:], padding, dilation, taps, stride)]
    # im2col as one strided view [R, *taps, *out] of the padded probes and one copy: a
    # kernel per tap costs more in launches than in bytes (GPU) for these small images.
    pixel_strides = zp.stride()[1:]
    view = zp.as_strided(
        (zp.shape[0], *taps, *out),
        (zp.stride(0), *(t * d for t, d in zip(pixel_strides, dilation)), *(t * s for t, s in zip(pixel_strides, stride))),
    )
    # reshape keeps a view (with overlapping strides) where no dims merge, e.g. in 1-d.
    return view.reshape(zp.shape[0], math.prod(taps), math.prod(out)).contiguous()


def independent_weight_grad(grad_y, sketch, cfg, seed, x_shape, weight, geom, order, basis):
    """The estimate of ``dW`` (float32, ``weight``'s shape) from ``grad_y [B, C_out, *S_out]`` and the
    sketch ``[B, C_in, r]``, by contraction ``order`` (:func:`xconv._cost.choose_contraction`)."""
    batch, c_in, spatial = x_shape[0], x_shape[1], x_shape[2:]
    weight_shape = weight.shape
    r, g = cfg.probes, geom.groups
    z = independent_probes(cfg, seed, batch, spatial, grad_y.dtype, grad_y.device, basis)
    if order == "decompress":
        zf = z.flatten(-len(spatial))
        x_hat = torch.bmm(sketch, zf) if cfg.per_sample else sketch @ zf  # [B, C_in, n] = S Z^T
        return weight_grad(grad_y, x_hat.view(x_shape), weight, geom, g).float()

    c_out, taps = grad_y.shape[1], weight_shape[2:]
    k = math.prod(taps)
    d = grad_y.reshape(batch, c_out, -1)  # [B, C_out, p]
    p = d.shape[2]
    s = sketch.float().view(batch, g, c_in // g, r)
    # A[b, o, j, k] = <D[b, o], Phi_k z_j> is one GEMM against the probes' im2col, then it is
    # contracted with the sketch. On small maps all of A can outgrow the activation, so it is
    # built in blocks of taps (and samples) below a quarter of D: backward temporaries must not
    # set the peak.
    samples, tap_block = _cost.probe_blocks(cfg, batch, p, c_out, k)
    if not cfg.per_sample:
        u = _probe_taps(z, taps, geom)  # [r, |K|, p]
    # Blocks fill a [|K|, g, C_out/g, C_in/g] buffer (C_in/g before C_out/g when transposed), so
    # each writes whole rows; backward copies it into the parameter's layout once.
    equation = "bgojk,bgij->kgio" if geom.transposed else "bgojk,bgij->kgoi"
    head = (g, c_in // g, c_out // g) if geom.transposed else (g, c_out // g, c_in // g)
    whole = samples >= batch and tap_block >= k
    dw = None if whole else torch.empty(k, *head, dtype=torch.float32, device=grad_y.device)
    for b0 in range(0, batch, samples):
        b1 = min(batch, b0 + samples)
        if cfg.per_sample:
            u_b = _probe_taps(z[b0:b1].flatten(0, 1), taps, geom).view(b1 - b0, r, k, p)
        for t0 in range(0, k, tap_block):
            t1 = min(k, t0 + tap_block)
            # [B, r |K|, C_out] with the pixels as the rows of the right operand, read as sketch_input
            # reads its input: a channels_last D needs no transposed copy.
            taps_block = u_b[:, :, t0:t1].reshape(b1 - b0, -1, p) if cfg.per_sample else \
                u[:, t0:t1].reshape(-1, p).expand(b1 - b0, -1, -1)
            a = torch.bmm(taps_block, d[b0:b1].transpose(1, 2)).transpose(1, 2)
            part = torch.einsum(equation, a.float().view(b1 - b0, g, c_out // g, r, t1 - t0), s[b0:b1])
            if whole:
                dw = part
            elif b0 == 0:
                dw[t0:t1] = part
            else:
                dw[t0:t1] += part
    shape = (c_in, c_out // g, *taps) if geom.transposed else (c_out, c_in // g, *taps)
    return dw.permute(1, 2, 3, 0).reshape(shape)


def multi_weight_grad(grad_y, sketch, cfg, seed, plan, x_shape, weight_shape, geom):
    """The estimate of ``dW`` (float32, ``weight_shape``) from ``grad_y [B, C_out, *S_out]`` and the
    sketch ``[B, r]``, one probe block of ``plan`` (:class:`xconv._sketch.ChunkPlan`) at a time."""
    spatial = x_shape[2:]
    g = geom.groups
    c_out = grad_y.shape[1]
    c_out_g = c_out // g
    dw = torch.zeros(weight_shape, dtype=torch.float32, device=grad_y.device)
    lifted, lifted_p0 = None, -1
    for p0, p1, c0, c1, z in plan.blocks(cfg, seed, spatial, grad_y.dtype, grad_y.device):
        if p0 != lifted_p0:  # L[j, o] = sum_b S[b, j] D[b, o], the probes' upstream gradient
            lifted = torch.einsum("bj,bo...->jo...", sketch[:, p0:p1], grad_y)
            lifted_p0 = p0
        if g == 1:
            o0, o1, call_groups = 0, c_out, 1
        else:
            o0, o1, call_groups = c0 // plan.unit * c_out_g, c1 // plan.unit * c_out_g, (c1 - c0) // plan.unit
        if geom.transposed:
            block_shape = (c1 - c0, c_out_g, *weight_shape[2:])
            dw[c0:c1] += weight_grad(lifted[:, o0:o1], z, block_shape, geom, call_groups).float()
        else:
            block_shape = (o1 - o0, (c1 - c0) // call_groups, *weight_shape[2:])
            target = dw[:, c0:c1] if g == 1 else dw[o0:o1]
            target += weight_grad(lifted[:, o0:o1], z, block_shape, geom, call_groups).float()
    return dw
