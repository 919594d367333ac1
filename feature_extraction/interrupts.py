"""SIGINT and SIGTERM as exceptions, so that the command-line tools stop cleanly with status 130 or 143.

Extraction turns both signals, and SIGHUP (status 129), into `Interrupted` and logs how to resume. The trainer and the
evaluator keep KeyboardInterrupt for SIGINT and get `TerminationRequested` for SIGTERM.
"""
import contextlib
import signal
from collections.abc import Iterator


def exit_status(signal_number: int) -> int:
    """Return the shell's exit status for a process ended by the signal: 128 + its number."""
    return 128 + signal_number


EXIT_SIGINT = exit_status(signal.SIGINT)
EXIT_SIGTERM = exit_status(signal.SIGTERM)
# SIGHUP arrives when the terminal or ssh session of a run closes
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """Raised in the main thread when SIGINT, SIGTERM or SIGHUP arrives."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return exit_status(self.signal_number)


# set while the main thread is inside `interrupts_deferred()`
_deferral = {"active": False, "pending": None}


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into `Interrupted`; a second one gets the default action."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signal_number, frame):
        # restore the defaults first, so a second signal stops a clean-up that hangs
        for sig, action in previous.items():
            signal.signal(sig, action)
        if _deferral["active"]:
            _deferral["pending"] = signal_number
            return
        raise Interrupted(signal_number)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
        _deferral["pending"] = None


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back `Interrupted` until the block ends, for steps that must not be cut in half.

    Receiving a batch from a DataLoader worker is such a step: an exception raised in the
    middle of it drops the connection that passes the tensor's memory, and the worker
    prints a traceback. A signal that arrives meanwhile raises `Interrupted` on exit,
    unless the block raised an exception of its own.
    """
    _deferral["active"] = True
    try:
        yield
    finally:
        _deferral["active"] = False
    pending = _deferral["pending"]
    if pending is not None:
        _deferral["pending"] = None
        raise Interrupted(pending)


class TerminationRequested(BaseException):
    """Exception raised by the SIGTERM handler of `sigterm_raises`, a BaseException so no `except Exception` swallows it."""


def _raise_termination(signal_number, frame):
    raise TerminationRequested()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Raise TerminationRequested in the main thread on SIGTERM while the block runs."""
    previous_handler = signal.signal(signal.SIGTERM, _raise_termination)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_for_signal(signal_number, frame):
    raise SystemExit(exit_status(signal_number))


def exit_quietly_on_signals() -> None:
    """Make SIGINT and SIGTERM end the process with status 130 or 143 and no traceback.

    Scripts call it before their heavy imports, so a Ctrl-C while torch loads prints no
    KeyboardInterrupt traceback. Handlers installed later take over from it.
    """
    signal.signal(signal.SIGINT, _exit_for_signal)
    signal.signal(signal.SIGTERM, _exit_for_signal)


def restore_default_signals() -> None:
    """Restore Python's SIGINT handler (KeyboardInterrupt) and the default SIGTERM action."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
