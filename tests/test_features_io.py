"""Joining HDF5 ids to list entries by id."""
import time

import pytest

from feature_extraction.image_list import ListEntry
from linear_adaptation.features_io import DataError, join_by_id


def _entries(paths):
    return [ListEntry(path, 0, 0, line_no) for line_no, path in enumerate(paths, start=1)]


def test_join_reports_duplicate_ids():
    paths = ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(DataError, match="1 duplicate HDF5 ids \\(e.g. 'b.jpg'\\)"):
        join_by_id(["a.jpg", "b.jpg", "c.jpg", "b.jpg"], _entries(paths))

    joined = join_by_id(["a.jpg", "b.jpg", "c.jpg", "b.jpg"], _entries(paths), allow_missing=True)
    assert joined.ids == ["a.jpg", "c.jpg"]
    assert joined.rows.tolist() == [0, 2]
    assert joined.report.missing_in_hdf5 == []


def test_join_every_id_duplicated_is_fast():
    # every id repeats, as in a file written twice into one. The join must stay linear: a
    # quadratic check of each list id against the duplicates took about 100 s for these ids.
    paths = [f"img/{i:07d}.jpg" for i in range(100_000)]
    start = time.perf_counter()
    with pytest.raises(DataError, match="100000 duplicate HDF5 ids"):
        join_by_id(paths + paths, _entries(paths))
    assert time.perf_counter() - start < 20
