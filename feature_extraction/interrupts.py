"""SIGINT and SIGTERM as an exception, so that a stopped run can log how to resume it."""
import contextlib
import signal
from collections.abc import Iterator

class Interrupted(Exception):
    """Raised in the main thread when SIGINT or SIGTERM arrives."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """Return the shell's status for a process ended by the signal: 128 + its number."""
        return 128 + self.signal_number


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into `Interrupted`; a second one gets the default action."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signal_number, frame):
        # restore the defaults first, so a second signal stops a clean-up that hangs
        for sig, action in previous.items():
            signal.signal(sig, action)
        raise Interrupted(signal_number)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
