"""Joining HDF5 ids to list entries by id."""
import h5py
import numpy as np
import pytest

from feature_extraction.image_list import ListEntry
from linear_adaptation.features_io import DataError, join_by_id, load_hdf5_features
from linear_adaptation.hdf5_shards import HDF5Database
from linear_adaptation.training_data import load_labelled_embeddings

# one path per form of the ILIAS id encoding, plus spaces and single quotes that stay as they are
ODD_PATHS = [
    "rp2k/货架 1.jpg",
    "caf\u00e9/a b.jpg",
    "q/it's \"x\".jpg",
    "q/it's.jpg",
    "emoji/\U0001f600.jpg",
    "back\\slash.jpg",
    "nb\u00a0sp.png",
    "plain/0.jpg",
]


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


def _ilias_escape(path: str) -> str:
    # the ILIAS extractor's id expression, written out here so that the test does not use escape_id
    return str(path.encode("unicode-escape")).replace("\\\\u", "#U").replace("\\\\x", "#U00")[2:-1]


def test_ilias_file_rows_join_odd_ids(tmp_path):
    # a file as the ILIAS extractor writes it (float16 rows, gzip level 0, ASCII ids), here in reverse list order
    features = np.eye(len(ODD_PATHS), dtype=np.float16)  # row of path k is the unit vector k
    hdf5_path = tmp_path / "ilias.hdf5"
    with h5py.File(hdf5_path, "w") as f:
        index = [_ilias_escape(p) for p in ODD_PATHS][::-1]
        f.create_dataset("index", data=index, dtype=h5py.string_dtype(encoding="ascii"))
        f.create_dataset("features", data=features[::-1], compression="gzip", compression_opts=0)
    list_path = tmp_path / "list.txt"
    list_path.write_text("".join(f"{p},{k},{k % 2}\n" for k, p in enumerate(ODD_PATHS)), encoding="utf-8")

    data, report = load_labelled_embeddings(hdf5_path, list_path, allow_missing=False, name="training")

    assert report.ok
    assert data.labels.tolist() == list(range(len(ODD_PATHS)))
    assert data.features[data.rows].argmax(axis=1).tolist() == data.labels.tolist()


def test_non_utf8_ids_named(tmp_path):
    # Regression: a Latin-1 id was reported as a damaged file, to be copied again.
    path = tmp_path / "latin1.hdf5"
    with h5py.File(path, "w") as f:
        f["features"] = np.eye(3, dtype=np.float32)
        f["index"] = np.array([b"a.jpg", "caf\u00e9.jpg".encode("latin-1"), b"c.jpg"], dtype="S")

    for read in (load_hdf5_features, lambda p: HDF5Database([p])):
        with pytest.raises(DataError) as excinfo:
            read(str(path))
        message = str(excinfo.value)
        assert f"id 1 of {str(path)!r} is not UTF-8 text" in message
        assert "caf\\xe9.jpg" in message
        assert "damaged" not in message
