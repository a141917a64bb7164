"""Triton's interpreter (TRITON_INTERPRET=1, how the tests run every kernel on CPU): whether it is on
(`interpreting`), and a fix for it on Triton 3.4-3.6 with numpy >= 2.4 (`fix_interpreter_scalars`).

The interpreter holds each scalar as a one-element numpy array. Triton 3.4-3.6 turn one into a Python int
with `int(array)`, which numpy 2.4 refuses for an array with a dimension ("only 0-dimensional arrays can be
converted to Python scalars"), and every loop whose bounds are runtime values (`range(lo, hi)`, `tl.range`)
needs that conversion: no kernel with such a loop can run. No way of writing the loop avoids it, so the fix
goes where Triton 3.7 put it: `int(array.squeeze())`. Compiled kernels never run this code.
"""

from __future__ import annotations

import functools
import os

FIXED_IN = (3, 7)  # the first Triton whose interpreter converts with squeeze()


@functools.cache
def fix_interpreter_scalars() -> bool:
    """Give Triton 3.4-3.6's interpreter the scalar conversion of Triton 3.7 (a no-op unless TRITON_INTERPRET
    is set and that Triton is installed); True when it patched."""
    if not interpreting():
        return False
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)  # sets tl.tensor's methods for each launch
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= FIXED_IN or original is None:
        return False

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)  # Triton 3.6 passes a scope that restores the methods after the launch
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (TRITON_INTERPRET set): the kernels that round to e4m3
    then round onto its grid first (triton_fp8.to_e4m3)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
