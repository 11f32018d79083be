"""Errors of bad input, shared by every side: the settings' own rules raise them, the actors'
runtime fails a command on them at once (never retried), the control endpoint answers 422."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (corpus, config): reported as-is and never retried."""


class FieldError(UserError):
    """Bad input in one field; `field` is its settings (wire) name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type[FieldError], tuple[str, str]]:
        # Pickled across the process pools with both arguments.
        return (FieldError, (self.field, self.message))
