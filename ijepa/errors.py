"""The one error type whose message is meant for the person who supplied the input."""


class InputError(ValueError):
    """An image, a box or a setting that cannot be used as given; the message says what to change.

    The app shows these messages as they are. Any other exception is a bug, not the user's doing, and is logged
    with its traceback. A ValueError subclass, so code that catches ValueError keeps working.
    """
