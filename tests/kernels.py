"""The skip marker of tests that need xconv's C kernels (``xconv/_native.c``) to build, and a
context that runs them on several threads."""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil

import pytest
import torch


def _compiler_found() -> bool:
    """Whether the compiler ``xconv._native`` would call exists: ``$CC``'s program, else cc, gcc or clang."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        return bool(words) and shutil.which(words[0]) is not None
    return any(map(shutil.which, ("cc", "gcc", "clang")))


needs_kernels = pytest.mark.skipif(not _compiler_found() or os.environ.get("XCONV_NATIVE") == "0",
                                   reason="no C compiler ($CC, cc, gcc or clang), or XCONV_NATIVE=0")


@contextlib.contextmanager
def torch_threads(threads: int):
    """Within the block torch (and so the kernels' thread split) uses ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
