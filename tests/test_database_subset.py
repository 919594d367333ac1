"""Database subsets: the selection file, the row filter, and block reads of the kept rows."""
import h5py
import numpy as np
import pytest

from feature_extraction.image_list import escape_id
from linear_adaptation.database_subset import make_row_filter, read_selected_ids
from linear_adaptation.features_io import DataError
from linear_adaptation.hdf5_shards import HDF5Database


def _write_hdf5(path, ids, features):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("index", data=np.array([escape_id(i) for i in ids], dtype=np.bytes_))


def test_selection_file_forms(tmp_path):
    path = tmp_path / "selected.txt"
    lines = ["\ufeffa/1.jpg", "  b/\u00e9.jpg  ", escape_id("c/\u00fc.jpg"), "", "d/2.jpg,4,1", "a/1.jpg"]
    path.write_bytes("\r\n".join(lines).encode("utf-8"))
    assert read_selected_ids(path) == {"a/1.jpg", escape_id("b/\u00e9.jpg"), escape_id("c/\u00fc.jpg"), "d/2.jpg"}


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank_lines"])
def test_selection_file_without_ids(tmp_path, content):
    path = tmp_path / "selected.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="lists no id; give one database id per line"):
        read_selected_ids(path)


def test_selection_line_without_id(tmp_path):
    path = tmp_path / "selected.txt"
    path.write_bytes(b"a.jpg\n\n ,1,0\n")
    with pytest.raises(DataError, match="selected.txt:3: the line has no id in its first field"):
        read_selected_ids(path)


def test_selection_file_not_utf8(tmp_path):
    path = tmp_path / "selected.txt"
    path.write_bytes(b"a.jpg\n\xff.jpg\n")
    with pytest.raises(DataError, match="selected.txt:2: invalid UTF-8"):
        read_selected_ids(path)


def test_row_filter_rules():
    keep = make_row_filter({"db/0/a.jpg", "0042"}, ["pos/7.jpg"])
    assert keep("db/0/a.jpg")  # listed id
    assert keep("yfcc/0042")  # listed second path component
    assert keep("yfcc/0042/x.jpg")
    assert keep("pos/7.jpg")  # a ground-truth positive
    assert not keep("db/0/b.jpg")
    assert not keep("yfcc/x/0042")


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"s{shard}/{row}.jpg" for shard in range(2) for row in range(7)]
    features = rng.standard_normal((14, 4)).astype(np.float32)
    paths = []
    for shard in range(2):
        paths.append(str(tmp_path / f"db_{shard}.hdf5"))
        _write_hdf5(paths[-1], ids[7 * shard : 7 * shard + 7], features[7 * shard : 7 * shard + 7])
    return paths, ids, features


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 100])
def test_kept_rows_read_in_blocks(shards, chunk_rows):
    paths, ids, features = shards
    kept_ids = {"s0/0.jpg", "s0/5.jpg", "s0/6.jpg", "s1/3.jpg"}
    database = HDF5Database(paths, keep_id=kept_ids.__contains__)

    kept = [row for row, image_id in enumerate(ids) if image_id in kept_ids]
    assert database.ids == [ids[row] for row in kept]
    assert database.rows_per_file == [3, 1]
    assert database.stored_rows_per_file == [7, 7]
    blocks = list(database.iterate_chunks(chunk_rows))
    assert all(0 < len(block) <= chunk_rows for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), features[kept])


@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_nan_only_checked_in_kept_rows(shards, chunk_rows):
    paths, ids, features = shards
    features = features.copy()
    features[[2, 9]] = np.nan  # s0/2.jpg is left out, s1/2.jpg is kept
    for shard in range(2):
        _write_hdf5(paths[shard], ids[7 * shard : 7 * shard + 7], features[7 * shard : 7 * shard + 7])

    without_nan = HDF5Database(paths, keep_id=lambda image_id: image_id != "s0/2.jpg" and image_id != "s1/2.jpg")
    assert sum(len(block) for block in without_nan.iterate_chunks(chunk_rows)) == 12

    with_nan = HDF5Database(paths, keep_id=lambda image_id: image_id in {"s0/1.jpg", "s1/0.jpg", "s1/2.jpg"})
    with pytest.raises(DataError, match=r"db_1.hdf5': row 2 \(id 's1/2.jpg'\) contains NaN or Inf"):
        list(with_nan.iterate_chunks(chunk_rows))


def test_repeated_ids_name_their_files(shards, tmp_path):
    paths, ids, features = shards
    # s0/4.jpg is repeated in the second shard, and s1/6.jpg occurs twice in a third file
    second = ids[7:13] + ["s0/4.jpg"]
    _write_hdf5(paths[1], second, features[7:])
    third = str(tmp_path / "db_2.hdf5")
    _write_hdf5(third, ["s1/6.jpg", "s1/6.jpg", "s2/0.jpg"], features[:3])

    database = HDF5Database([*paths, third])
    with pytest.raises(DataError) as error:
        database.check_unique_ids()
    message = str(error.value)
    assert message.startswith("2 database ids occur more than once")
    assert f"'s0/4.jpg' in {paths[0]!r} and {paths[1]!r}" in message
    assert f"'s1/6.jpg' in {third!r} (2 rows)" in message
    assert "remove the repeated rows or files" in message


def test_unique_ids_pass(shards):
    paths, _, _ = shards
    HDF5Database(paths).check_unique_ids()
    # s0/0.jpg is in both files, and only the rows that a selection keeps must be unique
    _write_hdf5(paths[1], ["s0/0.jpg"], np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(DataError, match="1 database ids occur more than once"):
        HDF5Database(paths).check_unique_ids()
    HDF5Database(paths, keep_id=lambda image_id: image_id != "s0/0.jpg").check_unique_ids()
