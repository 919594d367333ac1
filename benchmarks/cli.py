"""Command-line pieces shared by the benchmark scripts: help formatting and the summary output."""
import argparse
import json
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append the default to each flag's help, except for flags whose default is None (their help states it)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def emit_summary(summary: dict, json_path: str | None) -> None:
    """Print the summary as one `summary: {...}` line on stdout and, with `json_path`, save it as JSON."""
    print("summary: " + json.dumps(summary))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
