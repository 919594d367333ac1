"""The summary output shared by the benchmark scripts."""
import json
from pathlib import Path


def emit_summary(summary: dict, json_path: str | None) -> None:
    """Print the summary as one `summary: {...}` line on stdout and, with `json_path`, save it as JSON."""
    print("summary: " + json.dumps(summary))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
