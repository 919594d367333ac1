"""SIGTERM as an exception, so that command-line tools can stop cleanly with exit status 143."""
import contextlib
import signal
from collections.abc import Iterator

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class TerminationRequested(BaseException):
    """Raised from the SIGTERM handler; a BaseException so no `except Exception` swallows it."""


def _raise_termination(signum, frame):
    raise TerminationRequested()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Raise TerminationRequested in the main thread on SIGTERM while the block runs."""
    previous_handler = signal.signal(signal.SIGTERM, _raise_termination)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
