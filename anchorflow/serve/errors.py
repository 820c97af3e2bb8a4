"""The service's user-facing errors (torch-free, no Ray): below both request parsing and conditions."""

from __future__ import annotations

from ..base.errors import ConfigError


class RequestError(ConfigError):
    """A request the service cannot serve as asked; the message says what to change (HTTP ``status``, 400)."""

    status = 400


class BodyTooLarge(RequestError):
    """A request body over the service's documented limit (HTTP 413)."""

    status = 413
