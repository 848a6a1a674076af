"""One exception type for mistakes a user can fix. The CLI prints its message on one line, with no traceback."""


class GuppyError(Exception):
    """Bad input: a missing file, a malformed dataset, an unknown preset, a device that is not there."""
