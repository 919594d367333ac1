"""Exact kNN search against brute force, with chunking, self exclusion and ties."""
import numpy as np
import pytest
import torch

from linear_adaptation.knn import _exact_chunk_topk, _FaissBackend, _TorchBackend, iterate_chunks, knn_search


def _brute_force(queries, database, k, exclude_self):
    scores = queries.astype(np.float64) @ database.astype(np.float64).T  # (Q, N)
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(database.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    kept = np.take_along_axis(scores, order, 1)
    return np.where(np.isinf(kept), -np.inf, kept), np.where(np.isinf(kept), -1, order)


@pytest.fixture
def random_set():
    rng = np.random.default_rng(0)
    database = rng.standard_normal((300, 16)).astype(np.float32)
    return database / np.linalg.norm(database, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_brute_force(random_set, chunk_rows, exclude_self):
    queries = random_set[:40]
    scores, rows = knn_search(
        queries, iterate_chunks(random_set, chunk_rows), k=10, exclude_self=exclude_self, total_rows=300
    )
    expected_scores, expected_rows = _brute_force(queries, random_set, 10, exclude_self)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert scores.dtype == np.float32
    assert rows.dtype == np.int64


def test_self_never_returned(random_set):
    _, rows = knn_search(random_set, iterate_chunks(random_set, 50), k=20, exclude_self=True)
    assert not (rows == np.arange(300)[:, None]).any()


def test_k_above_database_pads():
    database = np.eye(3, dtype=np.float32)
    scores, rows = knn_search(database[:1], iterate_chunks(database, 2), k=5, exclude_self=True)
    assert rows.tolist() == [[1, 2, -1, -1, -1]]
    assert np.isneginf(scores[0, 2:]).all()
    assert scores[0, :2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("chunk_rows", [4, 11, 1000])
def test_ties_at_chunk_cut_keep_lower_rows(chunk_rows):
    # regression: faiss 1.15 alone returns rows 10, 4, 3, 2, 1 here, evicting row 0
    # from its heap when row 10 arrives, although row 0 scores the same as rows 1-4
    database = np.zeros((11, 2), dtype=np.float32)
    database[:, 0] = 1.0
    database[10, 0] = 2.0
    _, rows = knn_search(np.array([[1.0, 0]], dtype=np.float32), iterate_chunks(database, chunk_rows), k=5)
    assert rows.tolist() == [[10, 0, 1, 2, 3]]


@pytest.mark.parametrize("chunk_rows", [3, 50, 100, 1000])
def test_ties_with_self_exclusion(chunk_rows):
    database = np.zeros((300, 4), dtype=np.float32)
    database[:, 0] = 1.0
    database[::7, 0] = 0.5  # rows 0, 7, 14, ... score lower
    query = np.array([[1.0, 0, 0, 0]], dtype=np.float32)
    _, rows = knn_search(query, iterate_chunks(database, chunk_rows), k=5)
    assert rows.tolist() == [[1, 2, 3, 4, 5]]

    _, rows = knn_search(database[:3], iterate_chunks(database, chunk_rows), k=5, exclude_self=True)
    assert rows.tolist() == [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [1, 3, 4, 5, 6]]


def test_many_ties_match_brute_force():
    # small integer vectors give many equal scores, at random chunk and k sizes
    rng = np.random.default_rng(1)
    for _ in range(30):
        num_rows = int(rng.integers(5, 600))
        database = rng.integers(0, 3, (num_rows, 4)).astype(np.float32)
        queries = rng.integers(0, 3, (int(rng.choice([1, 30])), 4)).astype(np.float32)
        k = int(rng.integers(1, min(num_rows, 80) + 1))
        chunk_rows = int(rng.integers(1, num_rows + 1))
        _, rows = knn_search(queries, iterate_chunks(database, chunk_rows), k=k)
        _, expected = _brute_force(queries, database, k, exclude_self=False)
        np.testing.assert_array_equal(rows, expected, err_msg=f"rows={num_rows} k={k} chunk={chunk_rows}")


def test_equal_scores_everywhere_use_row_order():
    # every row ties, so the deeper searches must run until the chunk is exhausted
    database = np.ones((2000, 8), dtype=np.float32) / np.sqrt(8)
    _, rows = knn_search(database[:3], [database], k=10)
    assert rows.tolist() == [list(range(10))] * 3


@pytest.mark.parametrize("backend", [_FaissBackend(), _TorchBackend(torch.device("cpu"))], ids=["faiss", "torch"])
def test_chunk_backends_agree_on_ties(backend):
    database = np.zeros((500, 4), dtype=np.float32)
    database[:, 1] = 1.0
    database[10:20, 1] = 2.0
    queries = np.array([[0, 1.0, 0, 0], [0, -1.0, 0, 0]], dtype=np.float32)
    scores, rows = _exact_chunk_topk(queries, database, 15, backend)
    assert rows[0].tolist() == list(range(10, 20)) + [0, 1, 2, 3, 4]
    # for the negated query the scores of rows 10-19 come last
    assert rows[1].tolist() == list(range(10)) + list(range(20, 25))
    assert scores[0, :10].tolist() == [2.0] * 10


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match=r"expected \(rows, 4\)"):
        knn_search(np.zeros((2, 4), np.float32), [np.zeros((5, 3), np.float32)], k=2)


def test_bad_k_raises():
    with pytest.raises(ValueError, match="k must be at least 1"):
        knn_search(np.zeros((2, 4), np.float32), [np.zeros((5, 4), np.float32)], k=0)


def test_iterate_chunks_transform_and_sizes():
    array = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks = list(iterate_chunks(array, chunk_rows=2, transform=lambda block: block * 2))
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), array * 2)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_copies_tie_in_chunks_of_any_size(backend, monkeypatch):
    # BLAS picks kernels by matrix shape, so a product of other sizes can round one row's score
    # differently. Copies of one embedding must still tie and keep their row order.
    from linear_adaptation import knn

    if backend == "torch":
        # blocks smaller than the defaults keep the padded products quick on a CPU
        small = lambda: _TorchBackend(torch.device("cpu"), query_block=16, row_block=32)  # noqa: E731
        monkeypatch.setattr(knn, "_FaissBackend", small)
    rng = np.random.default_rng(0)
    for trial in range(6):
        dim = int(rng.choice([64, 512, 768]))
        num_rows, num_queries = int(rng.integers(20, 200)), int(rng.integers(1, 40))
        database = rng.standard_normal((num_rows, dim)).astype(np.float32)
        database /= np.linalg.norm(database, axis=1, keepdims=True)
        copies = np.sort(rng.choice(num_rows, 6, replace=False))
        database[copies] = database[copies[0]]
        queries = rng.standard_normal((num_queries, dim)).astype(np.float32)
        queries[0] = database[copies[0]] + 0.05 * queries[0]

        outcomes = []
        for chunk_rows in (1, 2, 3, 64, 1000):
            for subset in (num_queries, 1):
                scores, rows = knn_search(queries[:subset], iterate_chunks(database, chunk_rows), k=10)
                assert rows[0, :6].tolist() == copies.tolist(), (trial, chunk_rows, subset)
                assert len(set(scores[0, :6].tolist())) == 1, (trial, chunk_rows, subset)
                outcomes.append(scores[0].tolist())
        assert all(outcome == outcomes[0] for outcome in outcomes), trial
