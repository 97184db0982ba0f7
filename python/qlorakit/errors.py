"""qlorakit's exception classes (defined by the native module, re-exported here)."""

from qlorakit._core import NonFiniteError, QlorakitError, QuantizationError

__all__ = ["NonFiniteError", "QlorakitError", "QuantizationError"]
