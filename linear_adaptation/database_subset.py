"""A subset of the database rows to search, chosen by a file of selected ids.

The file has one id per line. A line of an image list (`path,label,domain`) also works,
since only the text before the first comma is read. Blank lines are skipped, and a line
whose first field is empty is an error. Ids may be escaped (`#Uxxxx`, as stored in HDF5)
or not.

A database row is kept when its id is selected, when the second component of its path
is selected, or when it is a positive of any query in the ground truth. The second rule
is how the ILIAS kNN search reads its mini-ILIAS list of distractor names, and the last
one keeps every positive, as that search keeps its whole positive file.
"""
import os
from collections.abc import Callable, Iterable

from feature_extraction.image_list import ImageListError, canonical_id, read_first_fields
from linear_adaptation.features_io import DataError


def read_selected_ids(path: str | os.PathLike) -> set[str]:
    """Read the canonical ids listed in a selection file (module docstring).

    Raises:
        DataError: The file cannot be read, is not UTF-8, or lists no id.
    """
    try:
        fields = read_first_fields(str(path))
    except ImageListError as e:
        raise DataError(str(e)) from e

    selected = {canonical_id(image_id) for _, image_id in fields}
    if not selected:
        raise DataError(f"the selection file {str(path)!r} lists no id; give one database id per line")
    return selected


def make_row_filter(selected: set[str], positives: Iterable[str]) -> Callable[[str], bool]:
    """Return a test of a canonical database id that is True for the rows to keep (module docstring)."""
    kept_ids = selected | set(positives)

    def keep(image_id: str) -> bool:
        if image_id in kept_ids:
            return True
        parts = image_id.split("/")
        return len(parts) > 1 and parts[1] in selected

    return keep
