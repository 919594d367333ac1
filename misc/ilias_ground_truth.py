"""Write the ground truth of the ILIAS image queries as the JSON that `evaluate.py --gt_path` reads.

ILIAS ships its ids in an `image_ids` folder: `image_query_ids.txt` and `positive_ids.txt`,
one image per line with the id in the first comma-separated field (the positive lines also
carry the object's scale and clutter). The first path component of an id names its instance,
and every positive of an instance is relevant to every query of that instance, as in the
ILIAS evaluation code (ilias-vrg/ilias, evaluation/src/dataset.py).

    python misc/ilias_ground_truth.py --ids_dir /data/ilias/image_ids --output ilias_gt.json

Exit status: 0 when the file is written, 1 for an unreadable or malformed id file or a
failed write, 130, 143 or 129 after SIGINT, SIGTERM or SIGHUP. Invalid arguments exit with 2: an --ids_dir without
both files, or an --output that is a folder, lies under a file or an unwritable folder,
or is one of the id files.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_extraction.image_list import read_first_fields  # noqa: E402
from feature_extraction.interrupts import EXIT_SIGINT, TerminationRequested, termination_raises  # noqa: E402
from linear_adaptation.arg_checks import check_not_an_input, check_output_file  # noqa: E402
from linear_adaptation.eval_report import write_json  # noqa: E402

QUERY_FILE = "image_query_ids.txt"
POSITIVE_FILE = "positive_ids.txt"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

_logger = logging.getLogger("ilias_ground_truth")


def read_ids(path: Path) -> list[str]:
    """Return the first comma-separated field of every non-blank line, in file order.

    Raises ValueError naming the file when it cannot be read, is not UTF-8, has a line
    whose first field is empty, repeats an id or lists none.
    """
    ids, seen = [], set()
    for line_number, image_id in read_first_fields(str(path)):
        if image_id in seen:
            raise ValueError(f"{path}:{line_number}: id {image_id!r} is listed twice; keep one line per image")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise ValueError(f"{str(path)!r} lists no id; is it an ILIAS id file?")
    return ids


def instance_of(image_id: str) -> str:
    return image_id.split("/", 1)[0]


def build_ground_truth(query_ids: list[str], positive_ids: list[str]) -> dict[str, list[str]]:
    """Map each query id to the positive ids of its instance, sorted, and warn about queries without any."""
    positives_of: dict[str, list[str]] = {}
    for image_id in sorted(positive_ids):
        positives_of.setdefault(instance_of(image_id), []).append(image_id)

    ground_truth = {query_id: positives_of.get(instance_of(query_id), []) for query_id in query_ids}
    without = [query_id for query_id, positives in ground_truth.items() if not positives]
    if without:
        _logger.warning(
            "%d queries have no positive in %s (e.g. %s); evaluate.py leaves them out of its means, "
            "where the ILIAS evaluation code scores them 0",
            len(without), POSITIVE_FILE, ", ".join(repr(q) for q in without[:5]),
        )
    return ground_truth


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1])
    parser.add_argument("--ids_dir", required=True, metavar="DIR",
                        help=f"ILIAS image_ids folder, containing {QUERY_FILE} and {POSITIVE_FILE}")
    parser.add_argument("--output", required=True, metavar="JSON", help="ground-truth file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    ids_dir, output = Path(args.ids_dir), Path(args.output)
    for name in (QUERY_FILE, POSITIVE_FILE):
        if not (ids_dir / name).is_file():
            parser.error(f"--ids_dir {args.ids_dir!r} has no {name}; give the ILIAS image_ids folder")
    check_output_file(parser, "--output", args.output)
    check_not_an_input(parser, "--output", args.output,
                       {"--ids_dir": [str(ids_dir / QUERY_FILE), str(ids_dir / POSITIVE_FILE)]})

    try:
        query_ids = read_ids(ids_dir / QUERY_FILE)
        positive_ids = read_ids(ids_dir / POSITIVE_FILE)
        ground_truth = build_ground_truth(query_ids, positive_ids)
    except ValueError as e:
        _logger.error("%s", e)
        return EXIT_ERROR
    try:
        write_json(args.output, ground_truth)
    except OSError as e:
        _logger.error("--output: %s", e)
        return EXIT_ERROR

    instances = {instance_of(q) for q in query_ids}
    _logger.info("wrote %s: %d queries of %d instances, %d positives", output, len(query_ids), len(instances),
                 len(positive_ids))
    return EXIT_OK


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # the output is written under a temporary name, which is removed unless the rename completed
    try:
        with termination_raises():
            status = main()
    except KeyboardInterrupt:
        _logger.error("interrupted (SIGINT); the output was not written")
        status = EXIT_SIGINT
    except TerminationRequested as e:
        _logger.error("terminated (%s); the output was not written", e)
        status = e.exit_code
    sys.exit(status)
