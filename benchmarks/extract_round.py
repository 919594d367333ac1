"""One end-to-end round of bench_extract.py, run in a new Python process.

bench_extract.py starts this script for every round, so each round begins as a user's
extract.py run does: a new process that builds the model and then forks its decode
workers. Rounds run inside the benchmark's own process were slower after the first one,
with worker processes only. The earlier rounds and the forward-only passes had written
the main process's heap, and after the fork each such page the model wrote again was
copied first (copy-on-write).

    python benchmarks/extract_round.py REQUEST.json RESULT.json

REQUEST.json contains the keyword arguments of `run_extraction`. RESULT.json receives the
extraction's counts and seconds and the peak memory of this process and its decode
workers. The exit status is extract.py's: 0, 1 for a failed extraction, 2 for invalid settings,
and 130, 143 or 129 when SIGINT, SIGTERM or SIGHUP stopped the round.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_extraction.interrupts import exit_quietly_on_signals  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_signals()  # until run_extraction's own handling starts, because importing torch takes seconds

from benchmarks.memory import PeakMemorySampler  # noqa: E402
from feature_extraction.extract import (  # noqa: E402
    EXIT_USAGE,
    EXTRACTION_FAILURES,
    extraction_exit_status,
    setup_logging,
)
from feature_extraction.pipeline import run_extraction  # noqa: E402


def run_round(request: dict) -> dict:
    """Run one extraction with the memory sampler and return its numbers."""
    with PeakMemorySampler() as memory:
        summary = run_extraction(**request)
    return {
        "num_images": summary.num_images,
        "num_embedded": summary.num_embedded,
        "rows_this_run": summary.rows_this_run,
        "embed_seconds": summary.embed_seconds,
        "seconds": summary.seconds,
        "peak_rss_mib": memory.peak_rss_mib,
        "peak_pss_mib": memory.peak_pss_mib,
        "peak_rss_uss_mib": memory.peak_rss_uss_mib,
        "start_rss_mib": memory.start_rss_mib,
        "max_processes": memory.max_processes,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {Path(__file__).name} REQUEST.json RESULT.json", file=sys.stderr)
        return EXIT_USAGE
    request_path, result_path = (Path(arg) for arg in argv)
    setup_logging()
    try:
        result = run_round(json.loads(request_path.read_text(encoding="utf-8")))
    except EXTRACTION_FAILURES as e:
        return extraction_exit_status(e)
    result_path.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
