"""Errors the ML core raises on purpose (defined in protocol.errors, where the settings'
own rules raise them too)."""

from protocol.errors import FieldError, UserError

__all__ = ["FieldError", "UserError"]
