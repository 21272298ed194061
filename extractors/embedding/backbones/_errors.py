"""The backbone errors: a name or weights file that cannot be used, weights that cannot be had."""

from __future__ import annotations

from extractors.common import HeadstartError


class BackboneError(HeadstartError, ValueError):
    """A backbone name or weights file that cannot be used; the message says what to do."""


class BackboneUnavailable(BackboneError):
    """Pretrained weights could not be fetched (offline, no cache)."""
