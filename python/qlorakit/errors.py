"""qlorakit's exception classes (defined by the native module, re-exported here)."""

from qlorakit._core import CheckpointError, NonFiniteError, QlorakitError, QuantizationError

__all__ = ["CheckpointError", "NonFiniteError", "QlorakitError", "QuantizationError"]
