"""The skip marker of tests that need xconv's C kernels (``xconv/_native.c``) to build."""
from __future__ import annotations

import os
import shlex
import shutil

import pytest


def _compiler_found() -> bool:
    """Whether the compiler ``xconv._native`` would call exists: ``$CC``'s program, else cc, gcc or clang."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])
        return bool(words) and shutil.which(words[0]) is not None
    return any(map(shutil.which, ("cc", "gcc", "clang")))


needs_kernels = pytest.mark.skipif(not _compiler_found() or os.environ.get("XCONV_NATIVE") == "0",
                                   reason="no C compiler ($CC, cc, gcc or clang), or XCONV_NATIVE=0")
