"""Errors the ML core raises on purpose."""


class UserError(ValueError):
    """Bad input from the user (corpus, config): reported as-is and never retried."""
