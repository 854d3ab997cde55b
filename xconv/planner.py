"""A byte-budget planner: what each XConv layer keeps for backward, chosen on one batch.

For every XConv layer the planner knows the bytes of each storage (exact input, SR low-bit input
at 16/8/4/2 bits, the paper's sketch at a few probe counts) and predicts the squared relative
error of the weight gradient each gives, ``E||dW_hat - dW||^2 / ||dW||^2``, from one forward and
backward on a real batch:

- SR storage: the error sums ``D * (q(x) - x)`` over independent elements, so its expected
  squared norm is the exact weight-gradient kernel applied to ``D^2`` and the rounding variance
  of ``x`` (:func:`xconv.quantize.rounding_variance`): a prediction, no draws.
- the sketch: the error of one draw at ``r0`` probes, scaled by ``r0 / r`` (its variance is
  ``~1/r``; paper section 3), averaged over :data:`SKETCH_DRAWS` draws.

It then picks one storage per layer to minimise the summed predicted squared relative error with
the total saved bytes (the layers' storage plus what the rest of the model keeps, measured) under
the budget: a multiple-choice knapsack solved by Lagrangian relaxation (bisection on the price of
a byte) and a greedy pass that spends what is left. The rest of the model (BatchNorm, max-pool,
1-bit ReLU) is planned by the options it was converted with, not here.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable

import torch
from torch import nn

from .convert import revert
from .memory import saved_tensor_bytes
from ._layer import _XConvMixin
from .quantize import rounding_variance, stored_bytes
from .storage_plan import LayerPlan, StoragePlan, check_budget

log = logging.getLogger(__name__)

#: Candidate storages: ("exact", None), ("quantized", bits), ("sketch", probes).
CANDIDATES = (("exact", None), ("quantized", 16), ("quantized", 8), ("quantized", 4), ("quantized", 2),
              ("sketch", 32), ("sketch", 8))
# Probes of the draws that measure a layer's sketch error.
MEASURE_PROBES = 8
# Draws averaged for that: the error of shared probes is correlated across weight entries, so one draw scatters widely.
SKETCH_DRAWS = 4


def _copy_as(module: nn.Module, **options) -> nn.Module:
    """A copy of an XConv layer sharing its weight, with the estimator ``options`` (the rest default).
    Call its ``forward``, not the copy itself: it shares the layer's hooks, the planner's among them."""
    layer = copy.copy(module)
    layer._init_xconv(None, distribution=module.sketch_config.distribution, **options)
    return layer


def _layer_candidates(module: nn.Module, x: torch.Tensor, stored_shape, grad: torch.Tensor,
                      candidates) -> tuple[float, list]:
    """``||dW||^2`` of one call of a layer on ``x`` and, per candidate storage, ``(storage, setting, bytes,
    E||dW_hat - dW||^2)``; ``stored_shape`` is the shape of what the layer keeps (with reflection padding)."""
    plain, weight = _copy_as(module, probes=0), module.weight
    with torch.enable_grad():
        exact = torch.autograd.grad(plain.forward(x), weight, grad)[0].double()
    out, sketch_error = [], None
    for storage, setting in candidates:
        if storage == "exact":
            out.append((storage, None, math.prod(stored_shape) * x.element_size(), 0.0))
        elif storage == "quantized":
            with torch.enable_grad():
                variance = rounding_variance(x, setting).to(x.dtype)
                error = torch.autograd.grad(plain.forward(variance), weight, grad.square())[0].double().sum().item()
            out.append((storage, setting, stored_bytes(stored_shape, setting), error))
        elif setting < math.prod(x.shape[2:]):  # a sketch smaller than the input
            if sketch_error is None:
                layer = _copy_as(module, probes=MEASURE_PROBES)
                with torch.enable_grad():
                    draws = [torch.autograd.grad(layer.forward(x), weight, grad)[0].double() for _ in range(SKETCH_DRAWS)]
                sketch_error = sum((d - exact).square().sum().item() for d in draws) / SKETCH_DRAWS * MEASURE_PROBES
            out.append((storage, setting, x.shape[0] * x.shape[1] * setting * x.element_size(), sketch_error / setting))
    return exact.square().sum().item(), out


def _measure(model: nn.Module, loss_fn: Callable, batch, candidates) -> dict[str, tuple]:
    """Run one exact forward and backward; per XConv layer that got a gradient, its input shape per call
    and ``(storage, setting, bytes, squared relative error)`` per candidate. A layer called several times
    (a discriminator on real and generated images) adds its calls' bytes and errors."""
    calls: dict[str, list] = {}

    def forward_hook(name):
        def hook(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                x = args[0].detach()
                stored_shape = tuple(module.estimator_input(x)[0].shape)
                output.register_hook(lambda grad: calls.setdefault(name, []).append(
                    (stored_shape, *_layer_candidates(module, x, stored_shape, grad.detach(), candidates))))

        return hook

    exact, handles = copy.deepcopy(model), []
    for name, module in exact.named_modules():
        if isinstance(module, _XConvMixin):
            module._init_xconv(None, probes=0)
            handles.append(module.register_forward_hook(forward_hook(name)))
    try:
        loss_fn(exact, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
    results = {}
    for name, layer_calls in calls.items():
        norm2 = sum(norm for _, norm, _ in layer_calls) or math.inf  # no gradient: every storage is exact
        per_call = zip(*(options for _, _, options in layer_calls))
        shapes = [shape for shape, _, _ in layer_calls]
        results[name] = (shapes, [(c[0][0], c[0][1], sum(o[2] for o in c), sum(o[3] for o in c) / norm2)
                                             for c in per_call])
    return results


def _solve(choices: list[list[tuple]], available: int) -> list[int]:
    """Indices of one choice per layer minimising the summed error with summed bytes <= ``available``."""

    def pick(price: float) -> list[int]:
        return [min(range(len(c)), key=lambda i: (c[i][3] + price * c[i][2], c[i][2])) for c in choices]

    def spent(picked) -> int:
        return sum(c[i][2] for c, i in zip(choices, picked))

    low, high = -60.0, 20.0  # log10 of the price of a byte, in squared relative error
    best = pick(10**high)
    for _ in range(80):
        mid = (low + high) / 2
        picked = pick(10**mid)
        if spent(picked) <= available:
            best, high = picked, mid
        else:
            low = mid
    # Spend what the relaxation left: the upgrade with the most error saved per byte, while it fits.
    while True:
        left = available - spent(best)
        upgrades = [((c[best[j]][3] - c[i][3]) / max(1, c[i][2] - c[best[j]][2]), j, i)
                    for j, c in enumerate(choices) for i in range(len(c))
                    if c[i][3] < c[best[j]][3] and c[i][2] - c[best[j]][2] <= left]
        if not upgrades:
            return best
        _, j, i = max(upgrades)
        best[j] = i


def plan_storage(model: nn.Module, loss_fn: Callable, batch, budget: float | None = None,
                 budget_bytes: int | None = None, candidates=CANDIDATES) -> StoragePlan:
    """Choose each XConv layer's storage so the model keeps at most the budget for backward.

    Args:
        model: a model converted with :func:`xconv.convert` (its XConv layers are planned; its
            other layers keep what they keep). Not changed: apply the result with
            :meth:`StoragePlan.apply`.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss of one training step.
        batch: what ``loss_fn`` takes; the plan is made for its batch size and shapes.
        budget: a fraction in (0, 1] of the bytes plain torch layers keep on ``batch``; or
        budget_bytes: the budget in bytes (exactly one of the two).
        candidates: ``(storage, setting)`` pairs, see :data:`CANDIDATES`.
    Returns:
        :class:`StoragePlan`.
    Raises:
        ValueError: both or neither budget given, ``budget`` outside (0, 1], ``budget_bytes``
            <= 0, a model without XConv layers, or a budget below the smallest storage.
    """
    if (budget is None) == (budget_bytes is None):
        raise ValueError("budget: give exactly one of budget (a fraction of plain-torch bytes) and budget_bytes")
    check_budget(budget)
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes <= 0):
        raise ValueError(f"budget_bytes must be an int > 0, got {budget_bytes!r}")
    plain = revert(copy.deepcopy(model))
    plain_bytes = saved_tensor_bytes(loss_fn, plain, batch, model=plain).total_bytes
    budget_bytes = budget_bytes if budget_bytes is not None else int(budget * plain_bytes)
    names = [name for name, m in model.named_modules() if isinstance(m, _XConvMixin)]
    if not names:
        raise ValueError("model: no XConv layers to plan; convert it with xconv.convert first")
    results = _measure(model, loss_fn, batch, candidates)
    planned = [n for n in names if n in results]  # layers that ran with a gradient
    # What the rest keeps: all planned layers at 8 bits (a fresh tensor each, shared with nothing), minus those.
    probe = copy.deepcopy(model)
    modules = dict(probe.named_modules())
    for name in planned:
        modules[name]._init_xconv(None, probes=0, storage="quantized", bits=8)
    other = saved_tensor_bytes(loss_fn, probe, batch, model=probe).total_bytes
    other -= sum(stored_bytes(shape, 8) for n in planned for shape in results[n][0])
    choices = [results[n][1] for n in planned]
    available = budget_bytes - other
    smallest = sum(min(c[2] for c in layer) for layer in choices)
    if smallest > available:
        raise ValueError(f"budget: {budget_bytes} bytes is below the smallest storage, {smallest + other} bytes "
                         f"({(smallest + other) / plain_bytes:.3f} of plain torch's {plain_bytes})")
    picked = _solve(choices, available)
    layers = [LayerPlan(n, results[n][0][0], c[i][0], c[i][1], c[i][2], math.sqrt(c[i][3]))
              for n, c, i in zip(planned, choices, picked)]
    plan = StoragePlan(budget_bytes, plain_bytes, max(0, other), layers)
    log.info("xconv storage plan:\n%s", plan.table())
    return plan
