"""Held-out mAP over many seeds: the trainer against the published step written with plain autograd.

A single training run on a small set moves by a few tenths of mAP from seed to seed, so one
number cannot tell a recipe difference from noise. This script trains the default recipe with
`train_linear_adapter` and with `benchmarks.reference_step` (the older tool's batch order) for
each seed, scores both on the held-out set, and prints the per-seed table and the mean,
standard deviation, minimum and maximum of each.

    python benchmarks/bench_seeds.py --train_features train.hdf5 --train_list train_paths.txt \\
        --val_features heldout.hdf5 --val_list heldout_paths.txt --seeds 30

Results go to stdout; one `summary: {...}` JSON line ends them (also saved with --json).
Exit status: 0 on success, 1 for unusable stored embeddings, a diverged run or a --json
file that could not be written, 2 for invalid arguments.
"""
import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_train import stored_inputs  # noqa: E402
from benchmarks.cli import SummaryWriteError, check_json_writable, check_threads, emit_summary  # noqa: E402
from benchmarks.machine import describe_machine, load_average  # noqa: E402
from benchmarks.reference_step import train_reference  # noqa: E402
from feature_extraction.flags import bool_flag  # noqa: E402
from feature_extraction.image_list import ImageListError  # noqa: E402
from linear_adaptation import train_lin_adapt  # noqa: E402
from linear_adaptation.arg_checks import (  # noqa: E402
    MAX_SEED,
    HelpFormatter,
    check_at_least_one,
    check_input_files,
    check_not_an_input,
    check_output_file,
    check_seed,
)
from linear_adaptation.features_io import DataError  # noqa: E402
from linear_adaptation.lin_adapt import LinearAdapter  # noqa: E402
from linear_adaptation.trainer import (  # noqa: E402
    LabelledEmbeddings,
    TrainingError,
    evaluate_retrieval,
    train_linear_adapter,
)

_logger = logging.getLogger("bench_seeds")
_DEFAULTS = train_lin_adapt.get_args_parser()
RUNS = ("trainer", "reference")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare the trainer with the plain published step over many seeds on stored embeddings.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--train_features", metavar="HDF5", required=True, help="training embeddings (ILIAS-layout HDF5)")
    parser.add_argument("--train_list", metavar="LIST", required=True, help="training 'path,label,domain' list")
    parser.add_argument("--val_features", metavar="HDF5", required=True, help="held-out embeddings")
    parser.add_argument("--val_list", metavar="LIST", required=True, help="held-out 'path,label,domain' list")
    parser.add_argument("--allow_missing", metavar="BOOL", type=bool_flag, nargs="?", const=True, default=False,
                        help="use the ids present in both list and HDF5 instead of stopping when they differ, as "
                             "train_lin_adapt.py does (true/false; the flag alone means true)")
    parser.add_argument("--seeds", metavar="N", type=int, default=10, help="number of seeds")
    parser.add_argument("--first_seed", metavar="N", type=int, default=0,
                        help="the seeds are first_seed .. first_seed+N-1, all within 0 to 2**63 - 1")
    parser.add_argument("--epochs", metavar="N", type=int, default=_DEFAULTS.get_default("num_epochs"),
                        help="passes over the training images")
    parser.add_argument("--batch_size", metavar="N", type=int, default=_DEFAULTS.get_default("batch_size"),
                        help="images per step, in both runs")
    parser.add_argument("--val_k", metavar="K", type=int, default=_DEFAULTS.get_default("val_k"),
                        help="ranking depth of the held-out mAP@k")
    parser.add_argument("--threshold", metavar="MAP", type=float, default=None,
                        help="also count the seeds whose all-queries mAP@k reaches MAP (percent, 0 to 100) "
                             "(default: none)")
    parser.add_argument("--threads", metavar="N", type=int, default=None,
                        help="torch intra-op threads, at most the usable cores (default: torch's choice, one per "
                             "usable core)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the summary to this JSON file (default: none)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject invalid counts, seeds and threshold, missing inputs and an unusable --json path with parser.error."""
    check_at_least_one(parser, args, ("seeds", "epochs", "batch_size", "val_k", "threads"))
    check_seed(parser, "--first_seed", args.first_seed)
    last_seed = args.first_seed + args.seeds - 1
    if last_seed > MAX_SEED:
        parser.error(f"--first_seed {args.first_seed} with --seeds {args.seeds}: the last seed is {last_seed}, "
                     f"above 2**63 - 1; lower --first_seed or --seeds")
    if args.threshold is not None and not (math.isfinite(args.threshold) and 0 <= args.threshold <= 100):
        parser.error(f"--threshold is {args.threshold}; it must be a percentage from 0 to 100")
    check_threads(parser, args.threads)

    input_flags = ("train_features", "train_list", "val_features", "val_list")
    inputs = {f"--{name}": [getattr(args, name)] for name in input_flags}
    check_input_files(parser, inputs)
    if args.json is not None:
        check_output_file(parser, "--json", args.json)
        check_not_an_input(parser, "--json", args.json, inputs)
        check_json_writable(parser, args.json)


def score(state_dict: dict, validation: LabelledEmbeddings, val_k: int) -> tuple[float, float]:
    """Return (all-queries mAP@k, macro mAP@k over domains) of the layer on the held-out set."""
    weight = state_dict["layer.weight"]
    adapter = LinearAdapter(weight.shape[1], weight.shape[0])
    adapter.load_state_dict(state_dict)
    metrics = evaluate_retrieval(adapter, validation, torch.from_numpy(validation.features), val_k)
    return metrics["all_queries"]["map"], metrics["map"]


def describe(values: list[float], threshold: float | None) -> dict:
    """Return the mean, sample standard deviation, minimum and maximum, and the count at the threshold when given.

    The standard deviation of a single value is None, because the sample standard deviation needs two.
    """
    array = np.asarray(values)
    stats = {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else None,
             "min": float(array.min()), "max": float(array.max())}
    if threshold is not None:
        stats["seeds_at_threshold"] = int((array >= threshold).sum())
    return stats


def _format_sd(sd: float | None) -> str:
    return "n/a" if sd is None else f"{sd:.2f}"


def main(args: argparse.Namespace) -> int:
    # before any work of this run, so that it measures only the other jobs on the machine
    load_before = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train, validation = stored_inputs(
        train_features=args.train_features, train_list=args.train_list, val_features=args.val_features,
        val_list=args.val_list, batch_size=args.batch_size, val_k=args.val_k, seed=0,
        allow_missing=args.allow_missing,
    )
    raw = evaluate_retrieval(None, validation, torch.from_numpy(validation.features), args.val_k)
    print(f"raw embeddings: all-queries mAP@{args.val_k} {raw['all_queries']['map']:.2f}, macro {raw['map']:.2f}")

    scores = {name: {"all_queries": [], "macro": []} for name in RUNS}
    print(f"{'seed':>4}  {'trainer all':>11}  {'macro':>6}  {'reference all':>13}  {'macro':>6}")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        layers = {
            "trainer": train_linear_adapter(train, num_epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                            show_progress=False).state_dict,
            "reference": train_reference(train, num_epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                         order="sampler"),
        }
        for name in RUNS:
            all_queries, macro = score(layers[name], validation, args.val_k)
            scores[name]["all_queries"].append(all_queries)
            scores[name]["macro"].append(macro)
        print(f"{seed:>4}  {scores['trainer']['all_queries'][-1]:>11.2f}  {scores['trainer']['macro'][-1]:>6.2f}  "
              f"{scores['reference']['all_queries'][-1]:>13.2f}  {scores['reference']['macro'][-1]:>6.2f}", flush=True)

    summary = {"seeds": [args.first_seed, args.first_seed + args.seeds - 1], "epochs": args.epochs,
               "batch_size": args.batch_size, "k": args.val_k,
               "raw": {"all_queries": raw["all_queries"]["map"], "macro": raw["map"]},
               "load_average_before": load_before, "load_average_after": load_average(), "machine": describe_machine()}
    for name in RUNS:
        summary[name] = {metric: describe(values, args.threshold if metric == "all_queries" else None)
                         for metric, values in scores[name].items()}
        all_q, macro = summary[name]["all_queries"], summary[name]["macro"]
        line = (f"{name}: all-queries mAP@{args.val_k} mean {all_q['mean']:.2f} (sd {_format_sd(all_q['sd'])}, "
                f"{all_q['min']:.2f}-{all_q['max']:.2f}), macro mean {macro['mean']:.2f} "
                f"(sd {_format_sd(macro['sd'])})")
        if args.threshold is not None:
            line += f"; {all_q['seeds_at_threshold']} of {args.seeds} seeds reach {args.threshold:g} over all queries"
        print(line)
    emit_summary(summary, args.json)
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    train_lin_adapt.setup_logging()
    logging.getLogger("linear_adaptation").setLevel(logging.WARNING)  # one line per seed is enough
    try:
        return main(args)
    except (DataError, ImageListError, TrainingError, SummaryWriteError) as e:
        _logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(run())
