"""The one error type users see as a one-line message (the CLI prints it without a traceback)."""


class LongtrainError(Exception):
    """A problem in the user's input (recipe, data, checkpoint, layout), or a run that cannot go on (non-finite
    steps in a row, a hung or dead peer rank), explained in one line."""
