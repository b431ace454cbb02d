"""The exceptions the app's UI catches, in a module without torch so that app.py can import them."""
from __future__ import annotations

from typing import Callable


class InputError(ValueError):
    """An image, a box or a setting that cannot be used as given; the message says what to change.

    The app shows these messages as they are. Any other exception is a bug, not the user's doing, and is logged
    with its traceback. A ValueError subclass, so code that catches ValueError keeps working.
    """


class WorkStopped(Exception):
    """Not a failure: work stopped because its caller's ``should_stop()`` said the result is no longer wanted (the
    app: the page shows another image now), checked between sampler steps and before each update."""

    @classmethod
    def raise_if_asked(cls, should_stop: Callable[[], bool] | None) -> None:
        """The one check every stop point makes (None: never stop)."""
        if should_stop is not None and should_stop():
            raise cls("stopped: the caller no longer wants the result")
