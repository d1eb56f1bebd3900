"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Something the user can fix (bad config, missing or corrupt file, incompatible models)."""
