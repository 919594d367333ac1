"""SIGINT, SIGTERM and SIGHUP as exceptions, so that the command-line tools stop cleanly with status 130, 143 or 129.

Extraction turns the three signals into `Interrupted` and logs how to resume. The trainer and the evaluator keep
KeyboardInterrupt for SIGINT and get `TerminationRequested` for SIGTERM and SIGHUP. A process started with SIGHUP
ignored, as `nohup` starts it, keeps ignoring it.
"""
import contextlib
import signal
from collections.abc import Iterator


def exit_status(signal_number: int) -> int:
    """Return the shell's exit status for a process ended by the signal: 128 + its number."""
    return 128 + signal_number


EXIT_SIGINT = exit_status(signal.SIGINT)
# SIGHUP arrives when the terminal or ssh session of a run closes
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# nohup starts a program with SIGHUP ignored so that it outlives the session. The scripts import this
# module before they install any handler, so this reads the setting the process started with.
_SIGHUP_IGNORED_AT_START = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def handled_signals(signals: tuple[int, ...]) -> tuple[int, ...]:
    """Return `signals` without SIGHUP when the process started with SIGHUP ignored."""
    return tuple(sig for sig in signals if not (sig == signal.SIGHUP and _SIGHUP_IGNORED_AT_START))


class _SignalStop:
    """Base of the exceptions that signal handlers raise: the signal's name as message, and its exit status."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return exit_status(self.signal_number)


class Interrupted(_SignalStop, Exception):
    """Raised in the main thread when SIGINT, SIGTERM or SIGHUP arrives."""


# set while the main thread is inside `interrupts_deferred()`
_deferral = {"active": False, "pending": None}

# The exception the last stop-signal handler raised, kept until the block that installed the handler
# ends. Python prints an exception raised inside a `__del__` method or a weakref callback as
# "Exception ignored" and goes on, so a handler that runs there would not stop the run.
_raised: dict[str, BaseException | None] = {"exception": None}


def _raise_from_handler(exception: BaseException) -> None:
    _raised["exception"] = exception
    raise exception


def raise_if_signal_lost() -> None:
    """Raise again the exception that a stop-signal handler raised in the current block, if any.

    Normally that exception has already ended the block, so it is still recorded here only
    when a finalizer dropped it. The three commands call this once per batch or step and
    before they write their outputs.
    """
    exception = _raised["exception"]
    if exception is not None:
        raise exception


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into `Interrupted`; a second one gets the default action."""
    previous = {sig: signal.getsignal(sig) for sig in handled_signals(STOP_SIGNALS)}

    def handler(signal_number, frame):
        # restore the defaults first, so a second signal stops a clean-up that hangs
        for sig, action in previous.items():
            signal.signal(sig, action)
        if _deferral["active"]:
            _deferral["pending"] = signal_number
            return
        _raise_from_handler(Interrupted(signal_number))

    for sig in previous:
        signal.signal(sig, handler)
    _raised["exception"] = None
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
        _deferral["pending"] = None
        _raised["exception"] = None


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


class TerminationRequested(_SignalStop, BaseException):
    """Raised in the main thread on SIGTERM or SIGHUP inside `termination_raises`.

    A BaseException, so no `except Exception` swallows it.
    """


def raise_wrapped_interrupt(error: BaseException) -> None:
    """Raise the signal exception in `error`'s cause or context chain, if there is one.

    A signal handler's exception (Interrupted, KeyboardInterrupt, SystemExit, TerminationRequested)
    that is raised inside a lazy import can come out wrapped in a RuntimeError, for example "Error
    calling __set_name__". Broad error handling calls this first, so the run still stops.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (Interrupted, TerminationRequested, KeyboardInterrupt, SystemExit)):
            raise error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


# a batch scheduler's cancel, and a closed terminal or ssh session
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_termination(signal_number, frame):
    _raise_from_handler(TerminationRequested(signal_number))


def _raise_keyboard_interrupt(signal_number, frame):
    _raise_from_handler(KeyboardInterrupt())


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """Raise TerminationRequested in the main thread on SIGTERM or SIGHUP, and KeyboardInterrupt on SIGINT, while the block runs.

    SIGINT keeps Python's meaning. It gets its own handler, which records the exception
    for `raise_if_signal_lost`.
    """
    previous = {sig: signal.signal(sig, _raise_termination) for sig in handled_signals(TERMINATION_SIGNALS)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    _raised["exception"] = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed from C, which Python cannot put back
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _raised["exception"] = None


def _exit_for_signal(signal_number, frame):
    raise SystemExit(exit_status(signal_number))


def exit_quietly_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP end the process with status 130, 143 or 129 and no traceback.

    Scripts call it before their heavy imports, so a Ctrl-C while torch loads prints no
    KeyboardInterrupt traceback. Handlers installed later take over from it.
    """
    for sig in handled_signals(STOP_SIGNALS):
        signal.signal(sig, _exit_for_signal)


def restore_default_signals() -> None:
    """Restore Python's SIGINT handler (KeyboardInterrupt) and the default SIGTERM and SIGHUP actions."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in handled_signals(TERMINATION_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)
