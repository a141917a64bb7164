"""SparsePrefillWarning and warn_once: how the library tells a user it did something other than asked.

Every fallback that changes speed (dense attention instead of sparse, the plain-PyTorch selection
instead of the fused one) is said once per reason, so a long run is not flooded and nothing is silent.
"""

from __future__ import annotations

import warnings


class SparsePrefillWarning(UserWarning):
    """A call went another way than the fast sparse path, for a reason the user may want to know."""


_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """Warn with `message` unless it was said already (since the last `forget_warnings`)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, SparsePrefillWarning, stacklevel=stacklevel + 1)


def forget_warnings() -> None:
    """Say every reason again from now on (`patch_model` calls this)."""
    _warned.clear()
