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
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from .convert import revert
from .memory import saved_tensor_bytes
from ._layer import _XConvMixin
from .quantize import rounding_variance, stored_bytes

log = logging.getLogger(__name__)

#: Candidate storages: ("exact", None), ("quantized", bits), ("sketch", probes).
CANDIDATES = (("exact", None), ("quantized", 16), ("quantized", 8), ("quantized", 4), ("quantized", 2),
              ("sketch", 32), ("sketch", 8))
# Probes of the draws that measure a layer's sketch error.
MEASURE_PROBES = 8
# Draws averaged for that: the error of shared probes is correlated across weight entries, so one draw scatters widely.
SKETCH_DRAWS = 4


@dataclass
class LayerPlan:
    """One layer's choice. ``bytes`` kept for backward; ``relative_error`` the predicted
    ``sqrt(E||dW_hat - dW||^2) / ||dW||`` of one step's weight gradient."""

    name: str
    input_shape: tuple[int, ...]
    storage: str
    setting: int | None
    bytes: int
    relative_error: float

    @property
    def label(self) -> str:
        return {"exact": "exact", "quantized": f"SR {self.setting}-bit", "sketch": f"sketch r={self.setting}"}[self.storage]


@dataclass
class StoragePlan:
    """The planner's result (all sizes in bytes).

    Attributes:
        budget_bytes: the budget the plan was made for.
        plain_bytes: what plain torch layers keep on the same batch.
        other_bytes: what the rest of the model keeps (measured, not planned here).
        layers: one :class:`LayerPlan` per XConv layer, in model order.
    """

    budget_bytes: int
    plain_bytes: int
    other_bytes: int
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Predicted bytes kept by the whole model with the plan applied."""
        return self.other_bytes + sum(layer.bytes for layer in self.layers)

    def apply(self, model: nn.Module) -> nn.Module:
        """Set every planned layer of ``model`` (found by name) to its chosen storage, in place."""
        modules = dict(model.named_modules())
        for layer in self.layers:
            module = modules[layer.name]
            cfg = module.sketch_config
            # The sketch as measured: independent mode, shared probes, no deflation.
            probes = {"exact": 0, "sketch": layer.setting}.get(layer.storage, cfg.probes)
            module._init_xconv(None, probes=probes, distribution=cfg.distribution, contraction=cfg.contraction,
                               storage="sketch" if layer.storage == "exact" else layer.storage,
                               bits=layer.setting if layer.storage == "quantized" else None)
        return model

    def table(self) -> str:
        """The per-layer choices as a fixed-width text table."""
        mib = 2**20
        lines = [f"{'layer':<40} {'input':>20} {'storage':>12} {'MiB':>8} {'rel. error':>10}"]
        for layer in self.layers:
            shape = "x".join(map(str, layer.input_shape))
            lines.append(f"{layer.name:<40} {shape:>20} {layer.label:>12} {layer.bytes / mib:8.2f} "
                         f"{layer.relative_error:10.4f}")
        lines.append(f"total {self.total_bytes / mib:.1f} MiB (layers {sum(l.bytes for l in self.layers) / mib:.1f}, "
                     f"rest {self.other_bytes / mib:.1f}) of budget {self.budget_bytes / mib:.1f} MiB; "
                     f"plain torch {self.plain_bytes / mib:.1f} MiB")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: the sizes and one entry per layer."""
        return {"budget_bytes": self.budget_bytes, "plain_bytes": self.plain_bytes, "other_bytes": self.other_bytes,
                "total_bytes": self.total_bytes,
                "layers": [{**asdict(layer), "input_shape": list(layer.input_shape)} for layer in self.layers]}


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
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise ValueError(f"budget must be a fraction in (0, 1] of plain-torch activation bytes, got {budget!r}")
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
