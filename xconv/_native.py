"""xconv's C kernels (``_native.c``: SR storage, the 1-bit ReLU's mask and gradient, 2-d max pooling):
built with the system C compiler at first use.

:func:`kernels` compiles the source once per machine into a cache folder (``$XCONV_CACHE_DIR``,
else ``$XDG_CACHE_HOME/xconv`` or ``~/.cache/xconv``), named by a hash of the source, the build
command and the machine type, and loads it with ``ctypes`` (building again where a cached file
does not load). Where no compiler builds it, it returns None after one warning (with
``XCONV_NATIVE=0``, silently) and :mod:`xconv.quantize`, :mod:`xconv._bits` and :mod:`xconv.pooling`
run their torch-op code, which computes the same bits. Builds of several processes at once are safe:
each writes its own file and renames it into place. :func:`run_split` runs a kernel over ranges on
torch's threads.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
# Below this many elements a kernel runs on the calling thread: a hand-off to the pool would cost more
# than it saves (a one-pass kernel over fp32; measured with two threads on 8x256x16x16 and 8x64x64x64).
PARALLEL_MIN_ELEMENTS = 1 << 21


def _compiler() -> list[str]:
    """``$CC``, else the first of cc, gcc and clang on the PATH (not Python's build-time compiler,
    which may be a toolchain this machine lacks)."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    return [next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), "cc")]


def default_cache_dir() -> Path:
    """xconv's cache folder: ``$XDG_CACHE_HOME/xconv``, by default ``~/.cache/xconv`` (the kernels'
    default, and the GAN task's FID classifier's)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xconv"


def _build(rebuild: bool = False) -> Path:
    """The shared library of ``_native.c`` in ``$XCONV_CACHE_DIR`` (else :func:`default_cache_dir`),
    compiled first where it is not there (or ``rebuild``)."""
    command = [*_compiler(), *_FLAGS]
    key = [_SOURCE.read_bytes(), " ".join(command).encode(), platform.machine().encode()]
    folder = Path(os.environ["XCONV_CACHE_DIR"]) if os.environ.get("XCONV_CACHE_DIR") else default_cache_dir()
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    target = folder / f"native-{digest}.so"
    if rebuild or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, "-o", partial, str(_SOURCE), "-lm"], check=True, capture_output=True,
                           text=True, timeout=120)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(_build()))
    except OSError:  # a cached file that does not load (truncated, another machine's): build it again
        return ctypes.CDLL(str(_build(rebuild=True)))


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels (``xconv_sr_quantize``, ``xconv_sr_dequantize``, ``xconv_sr_bf16``,
    ``xconv_sign_bits``, ``xconv_sign_bits_backward``, ``xconv_max_pool2d``, ``xconv_max_pool2d_backward``,
    argument types set), or None where they cannot be built or ``XCONV_NATIVE=0``; the reason is warned
    once."""
    if os.environ.get("XCONV_NATIVE", "1") == "0":
        return None
    try:
        lib = _load()
    except (OSError, ValueError, subprocess.SubprocessError) as err:  # ValueError: a $CC shlex cannot split
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"xconv: could not build its C kernels ({str(detail).strip()[:300]}); using torch ops, "
                      "which compute the same bits more slowly", RuntimeWarning, stacklevel=2)
        return None
    lib.xconv_sr_quantize.argtypes = [_P, _I, _I, _I, _I, _I, ctypes.c_int, _I, _P, _P, _P]
    lib.xconv_sr_dequantize.argtypes = [_P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int, _P]
    lib.xconv_sign_bits.argtypes = [_P, _I, _I, _I, ctypes.c_int, _P]
    lib.xconv_sign_bits_backward.argtypes = [_P, _P, _I, _I, _I, ctypes.c_int, ctypes.c_float, _P]
    lib.xconv_sr_bf16.argtypes = [_P, _I, _I, _I, _I, _P]
    lib.xconv_max_pool2d.argtypes = [_P, *[_I] * 14, _P, _P]
    lib.xconv_max_pool2d_backward.argtypes = [_P, _P, *[_I] * 14, _P]
    lib.xconv_set_fp_mode.argtypes = [ctypes.c_uint]
    lib.xconv_fp_mode.restype = ctypes.c_uint
    for name in ("xconv_sr_quantize", "xconv_sr_dequantize", "xconv_sr_bf16", "xconv_sign_bits",
                 "xconv_sign_bits_backward", "xconv_max_pool2d", "xconv_max_pool2d_backward", "xconv_set_fp_mode"):
        getattr(lib, name).restype = None
    return lib


def kernels_for(x: torch.Tensor) -> ctypes.CDLL | None:
    """The C kernels where they can work on ``x`` in place: a contiguous, non-empty fp32 CPU tensor and
    kernels loaded; else None."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel() > 0:
        return kernels()
    return None


def plain_eager(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain tensor computed eagerly, so that a C kernel may read and write its memory:
    not a subclass (FakeTensor), not traced (``torch.compile``, ``torch.jit.trace``), no dispatch mode
    (``FakeTensorMode``, ``make_fx``, logging modes) and no functorch transform (``vmap``) active."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active())


def direct(op, fn, x: torch.Tensor):
    """``fn`` itself where calling it is calling the custom op ``op`` that wraps it (:func:`plain_eager`
    ``x``), else ``op``, which tracers, modes and transforms see and fake tensors run. The op's
    dispatch costs ~8 us a call, ~1 ms of a U-Net training step's (160 calls)."""
    return fn if plain_eager(x) else op


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="xconv-native")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's pool threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def run_split(kernel, units: int, elements: int, min_elements: int | None = None, align: int = 1) -> None:
    """Call ``kernel(u0, u1)`` over ``[0, units)``: on the calling thread where the work is below
    ``min_elements`` elements (``elements`` per unit; default :data:`PARALLEL_MIN_ELEMENTS`), else split
    across ``torch.get_num_threads()`` threads (ctypes releases the GIL) at multiples of ``align`` units,
    each in the calling thread's floating-point mode (``torch.set_flush_denormal`` sets it per thread)."""
    threads = torch.get_num_threads()
    if threads <= 1 or units * elements < (PARALLEL_MIN_ELEMENTS if min_elements is None else min_elements):
        kernel(0, units)
        return
    chunk = -(-units // threads)
    chunk = -(-chunk // align) * align
    lib = kernels()
    mode = lib.xconv_fp_mode()

    def part(u0: int) -> None:
        lib.xconv_set_fp_mode(mode)
        kernel(u0, min(u0 + chunk, units))

    list(_pool(threads).map(part, range(0, units, chunk)))
