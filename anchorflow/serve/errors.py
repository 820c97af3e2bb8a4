"""The service's user-facing error (torch-free, no Ray): below both request parsing and conditions."""

from __future__ import annotations

from ..errors import ConfigError


class RequestError(ConfigError):
    """A request the service cannot serve as asked; the message says what to change (HTTP 400)."""
