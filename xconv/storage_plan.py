"""What the byte-budget planner (:func:`xconv.plan_storage`) chose: per-layer storage, its bytes and
predicted error, applied to a model, printed, or kept as plain data (``summary.json``, checkpoints)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn


def check_budget(budget: float | None) -> None:
    """Raise ValueError unless ``budget`` is None or a fraction in (0, 1] (of plain-torch activation bytes)."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1):
        raise ValueError(f"budget must be None or a fraction in (0, 1] of plain-torch activation bytes, got {budget!r}")


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
