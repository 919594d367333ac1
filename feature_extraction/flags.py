"""Boolean command-line values shared by the three commands."""
import argparse

_TRUE = ("true", "on", "1", "yes", "y", "t")
_FALSE = ("false", "off", "0", "no", "n", "f")


def bool_flag(value: str) -> bool:
    """Parse true/false, on/off, 1/0, yes/no or y/n, t/f (any case) for argparse."""
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}; use true/false, on/off, 1/0 or yes/no")
