"""Joining HDF5 ids to list entries by id."""
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


def test_join_every_id_duplicated():
    # as in one output file written twice into the same HDF5 file
    paths = [f"img/{i:05d}.jpg" for i in range(1000)]
    with pytest.raises(DataError, match="1000 duplicate HDF5 ids"):
        join_by_id(paths + paths, _entries(paths))

    joined = join_by_id(paths + paths[:500], _entries(paths), allow_missing=True)
    assert joined.ids == paths[500:]
    assert joined.rows.tolist() == list(range(500, 1000))
    assert joined.report.missing_in_hdf5 == []
    assert joined.report.duplicate_ids == paths[:500]
