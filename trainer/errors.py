"""The one error type users see as a one-line message (the CLI prints it without a traceback)."""


class LongtrainError(Exception):
    """A problem in the user's input (recipe, data, checkpoint, layout), explained in one line."""
