"""Errors recopt raises for problems a user can fix.

Each message names the problem and the fix; none should need a traceback
from inside torch to be understood.
"""


class RecoptError(Exception):
    """Base class of recopt's user-facing errors."""


class InputError(RecoptError, ValueError):
    """Bad arguments: the model, example inputs, target, or pass names."""


class CaptureError(RecoptError):
    """No capture method could turn the model into one fx graph."""


class PassError(RecoptError):
    """A pass raised or broke the model while running with ``strict=True``."""


class VerificationError(RecoptError):
    """A rewrite changed the model's outputs beyond tolerance (``strict=True``)."""


class MissingDependencyError(RecoptError, ImportError):
    """An optional dependency is needed for this feature."""


def require(module: str, extra: str, feature: str):
    """Import an optional dependency or raise an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the optional package {module!r} ({e}); "
            f"install it with: pip install 'recopt[{extra}]'"
        ) from None
