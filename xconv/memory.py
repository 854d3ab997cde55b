"""Activation-memory accounting: bytes of tensors saved for backward, and the CUDA peak."""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._classes import conversion_status


#: :attr:`SavedTensorReport.status` values, in the order :meth:`SavedTensorReport.summary` lists them.
STATUSES = ("converted", "convertible", "unconvertible")


@dataclass
class SavedTensorReport:
    """Result of :func:`saved_tensor_bytes`; all sizes in bytes.

    Attributes:
        total_bytes: bytes of the distinct storages saved for backward (each storage counted
            once, whole, since a saved view keeps its whole storage alive).
        by_module: bytes attributed to the innermost module running when the storage was
            first saved (``"<outside>"`` outside any module), when a model was given. Bytes
            under a module that has children were saved by the ops its own ``forward`` calls
            outside them (``F.relu(x)``, ``x * y``).
        status: for each key of ``by_module``, how :func:`xconv.convert` treats what saved it
            (:func:`xconv._classes.conversion_status`): ``"converted"`` (an xconv layer),
            ``"convertible"`` (a torch layer ``convert`` replaces with other options or
            ``include``/``exclude``) or ``"unconvertible"`` (other layers, ops called in a
            ``forward``, ``"<outside>"``): bytes ``convert`` cannot reduce.
        holder: for each key of ``by_module``, what saved it: the module's class name, with
            ``" ops in forward"`` for a module with children, or ``"outside the model"``.
        result: what ``fn`` returned.
    """

    total_bytes: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    result: Any = None
    status: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)

    def _check_attributed(self) -> None:
        if not self.status:
            raise ValueError("measure with saved_tensor_bytes(..., model=model) to attribute the bytes")

    def bytes_by_status(self) -> dict[str, int]:
        """Bytes per :data:`STATUSES` value (every value present, 0 when none), summing to
        ``total_bytes``.

        Raises:
            ValueError: the report was made without ``model`` (nothing to attribute).
        """
        self._check_attributed()
        totals = dict.fromkeys(STATUSES, 0)
        for name, size in self.by_module.items():
            totals[self.status[name]] += size
        return totals

    def unconverted(self, n: int | None = None) -> list[tuple[str, str, str, int]]:
        """The ``n`` (None: all) largest holders not converted, largest first.

        Returns:
            ``(name, holder, status, bytes)`` tuples for the ``"convertible"`` and
            ``"unconvertible"`` keys of ``by_module``.
        Raises:
            ValueError: the report was made without ``model`` (nothing to attribute).
        """
        self._check_attributed()
        rows = [(name, self.holder[name], self.status[name], size)
                for name, size in self.by_module.items() if self.status[name] != "converted"]
        return sorted(rows, key=lambda row: -row[3])[:n]

    def summary(self, n: int = 5) -> str:
        """Text lines: the total, the share per status, and the ``n`` largest kinds of unconverted
        holder (bytes summed over the modules of one ``holder`` value, with their count and the
        largest one's name).

        Raises:
            ValueError: the report was made without ``model`` (nothing to attribute).
        """
        total = max(self.total_bytes, 1)
        shares = ", ".join(f"{status} {size / total:.1%}" for status, size in self.bytes_by_status().items())
        lines = [f"saved for backward: {self.total_bytes / 2**20:.2f} MiB ({shares})"]
        kinds: dict[tuple[str, str], list] = {}
        for name, holder, status, size in self.unconverted():  # largest first: a kind's first name is its largest
            kind = kinds.setdefault((holder, status), [0, 0, name])
            kind[0] += size
            kind[1] += 1
        if kinds:
            lines.append("not converted, by holder:")
        for (holder, status), (size, count, largest) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:n]:
            lines.append(f"  {holder} ({status}): {size / 2**20:.2f} MiB, {size / total:.1%}, "
                         f"{count} module{'s' if count > 1 else ''}, largest {largest}")
        return "\n".join(lines)


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dtype/device copy of an ``nn.Parameter`` (its gradient flows to the parameter's AccumulateGrad)."""
    fn = t.grad_fn
    return fn is not None and fn.name() == "ToCopyBackward0" and any(
        isinstance(getattr(f, "variable", None), nn.Parameter) for f, _ in fn.next_functions
    )


def saved_tensor_bytes(fn: Callable, *args, model: nn.Module | None = None, **kwargs) -> SavedTensorReport:
    """Run ``fn(*args, **kwargs)`` once and count the activation memory it keeps for backward.

    Counts every tensor packed by autograd (``torch.autograd.graph.saved_tensors_hooks``),
    deduplicated by storage, excluding ``nn.Parameter`` objects, dtype casts of parameters
    (autocast's bf16/fp16 weight copies: weight-sized, not activations) and, when ``model``
    is given, any tensor sharing a storage with its parameters or buffers. This
    is the activation memory that XConv and the 1-bit ReLU reduce.

    Saved-tensor hooks turn off autograd's check for in-place changes to saved tensors, so a
    backward through ``result`` does not catch them: measure, then train on a separate forward.

    Args:
        fn: typically ``lambda: loss_fn(model(x), y)``; grad mode must be on.
        model: when given, bytes are broken down by ``model.named_modules()`` name (a module
            shared by several names under its first) and by conversion status.
    Returns:
        :class:`SavedTensorReport`; sizes in bytes.
    """
    seen: set[tuple] = set()
    if model is not None:
        seen.update(_storage_key(t) for t in (*model.parameters(), *model.buffers()))
    by_module: dict[str, int] = defaultdict(int)
    running: list[str] = []

    # Autograd keeps the pack hook and what it returns alive as long as the graph; neither may
    # reach the graph, or they form a cycle through C++ that Python's gc cannot free: the hook
    # does not see the result, and a saved output (ReLU's) is returned without its grad_fn
    # (unpacking attaches the saved autograd metadata again).
    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or _is_parameter_cast(t):
            return t
        try:
            key = _storage_key(t)
        except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
            return t
        if key not in seen:
            seen.add(key)
            by_module[running[-1] if running else "<outside>"] += key[2]
        return t.detach()

    def enter(name: str):
        def hook(module, args) -> None:
            running.append(name)

        return hook

    def leave(module, args, output) -> None:
        running.pop()

    handles = []
    status, holder = {}, {}
    if model is not None:
        status["<outside>"], holder["<outside>"] = "unconvertible", "outside the model"
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
            status[name] = conversion_status(module)
            holder[name] = type(module).__name__ + (" ops in forward" if next(module.children(), None) else "")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = fn(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return SavedTensorReport(total_bytes=sum(by_module.values()), by_module=dict(by_module), result=result,
                             status={k: status[k] for k in by_module} if status else {},
                             holder={k: holder[k] for k in by_module} if holder else {})


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return storage.device, storage.data_ptr(), storage.nbytes()


def cuda_peak_memory_bytes(fn: Callable, *args, device=None, **kwargs) -> int | None:
    """Peak CUDA memory allocated (bytes, ``torch.cuda.max_memory_allocated``) while ``fn`` runs.

    The peak includes everything allocated on the device (parameters, optimizer state,
    activations, temporaries). Returns None without calling ``fn`` when CUDA is unavailable or
    ``device`` is not a CUDA device (a CPU run on a machine that has a GPU).
    """
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storages created by ops while active until each is freed; keeps the maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._outside: set[int] = set()  # storages an op received that no op here created

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # A view or in-place result of an input or parameter shares its storage: not new memory.
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._sizes and key not in self._outside:
                    self._outside.add(key)
                    weakref.finalize(storage, self._outside.discard, key)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._sizes and key not in self._outside:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def peak_tensor_bytes(fn: Callable, *args, **kwargs) -> int:
    """Peak bytes of tensors created while ``fn(*args, **kwargs)`` runs and alive at once.

    The device-independent analogue of ``torch.cuda.max_memory_allocated`` over ``fn``, for
    CPU runs: every storage an op creates is counted from its creation until it is freed
    (activations, saved tensors, gradients, temporaries); tensors that existed before the
    call (parameters, inputs) are not. Allocator caching and fragmentation are not counted.
    Slows ``fn`` down (a Python hook per op): for measuring, not for training.
    """
    tracker = _LiveTensorBytes()
    with tracker:
        fn(*args, **kwargs)
    return tracker.peak
