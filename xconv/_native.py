"""The C kernels of SR storage (``_sr_kernels.c``): built with the system C compiler at first use.

:func:`kernels` compiles the source once per machine into a cache folder (``$XCONV_CACHE_DIR``,
else ``$XDG_CACHE_HOME/xconv`` or ``~/.cache/xconv``), named by a hash of the source, the build
command and the machine type, and loads it with ``ctypes`` (building again where a cached file
does not load). Where no compiler builds it, it returns None after
one warning (with ``XCONV_NATIVE=0``, silently) and :mod:`xconv.quantize` runs its torch-op code,
which stores the same bits. Builds of several processes at once are safe: each writes its
own file and renames it into place.
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
from pathlib import Path

_SOURCE = Path(__file__).with_name("_sr_kernels.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]
_P, _I = ctypes.c_void_p, ctypes.c_int64


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
    """The shared library of ``_sr_kernels.c`` in ``$XCONV_CACHE_DIR`` (else :func:`default_cache_dir`),
    compiled first where it is not there (or ``rebuild``)."""
    command = [*_compiler(), *_FLAGS]
    key = [_SOURCE.read_bytes(), " ".join(command).encode(), platform.machine().encode()]
    folder = Path(os.environ["XCONV_CACHE_DIR"]) if os.environ.get("XCONV_CACHE_DIR") else default_cache_dir()
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    target = folder / f"sr_kernels-{digest}.so"
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
    """The loaded kernels (``xconv_sr_quantize``, ``xconv_sr_dequantize``, argument types set), or None
    where they cannot be built or ``XCONV_NATIVE=0``; the reason is warned once."""
    if os.environ.get("XCONV_NATIVE", "1") == "0":
        return None
    try:
        lib = _load()
    except (OSError, ValueError, subprocess.SubprocessError) as err:  # ValueError: a $CC shlex cannot split
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"xconv: could not build the C kernels of SR storage ({str(detail).strip()[:300]}); "
                      "using torch ops, which store the same bits more slowly", RuntimeWarning, stacklevel=2)
        return None
    lib.xconv_sr_quantize.argtypes = [_P, _I, _I, _I, _I, _I, ctypes.c_int, _I, _P, _P, _P]
    lib.xconv_sr_dequantize.argtypes = [_P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int, _P]
    lib.xconv_sr_quantize.restype = lib.xconv_sr_dequantize.restype = None
    return lib
