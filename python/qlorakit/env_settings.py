"""Settings chosen by environment variables: one parser and one error for all of them."""

from __future__ import annotations

import os
from collections.abc import Sequence

from qlorakit.errors import QlorakitError


def env_choice(name: str, choices: Sequence[str], what: str) -> str:
    """The value of environment variable ``name``, one of ``choices`` (unset or blank: the first); any other value
    raises :class:`~qlorakit.errors.QlorakitError` naming the variable, the value (``what`` says what it should
    be) and the choices."""
    value = os.environ.get(name, "").strip() or choices[0]
    if value not in choices:
        raise QlorakitError(f"{name}={value!r} is not a {what}; expected one of {', '.join(choices)}")
    return value
