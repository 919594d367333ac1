"""Exact inner-product kNN search over a database streamed in chunks.

On CPU each database chunk goes through a faiss `IndexFlatIP`; on CUDA through a
torch matmul and top-k. Partial top-k lists are merged chunk by chunk, so memory is
bounded by one chunk, its (Q, k) candidates and the (Q, k) results.

Ties are broken by the lower database row, whatever the backend or the chunking.
Neither faiss nor `torch.topk` guarantees which of several equal scores survives a
cut to k (faiss 1.15 may evict row 0 of five tied rows when a better row arrives), so
each chunk is searched a little deeper than needed. A query whose score at the cut still equals the deepest score fetched is
searched again with twice the depth, until the cut is strict or the chunk is exhausted.

Equal means equal as computed. faiss gives a database row the same score in any chunk and
for any number of queries, so copies of one embedding tie. A torch matmul can round one
row's score differently in products of other shapes, so the torch backend pads every
product to one shape. Tests check both backends on CPU. Whether cuBLAS then scores copies
alike was not checked on a GPU.
"""
import logging
from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np
import torch
from tqdm import tqdm

_logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 65536

_MIN_EXTRA_DEPTH = 16  # rows fetched beyond the cut per chunk, so that ties at the cut are seen
_RESEARCH_BLOCK_ELEMENTS = 1 << 24  # queries x depth per deeper search of tied queries
_NO_ROW = np.iinfo(np.int64).max  # sorts after every real row


class _FaissBackend:
    """Exact search of one chunk with a faiss flat inner-product index on CPU."""

    def prepare(self, chunk: np.ndarray) -> faiss.IndexFlatIP:
        index = faiss.IndexFlatIP(chunk.shape[1])
        index.add(chunk)
        return index

    def search(self, index: faiss.IndexFlatIP, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = index.search(queries, depth)
        return scores, rows.astype(np.int64)


class _TorchBackend:
    """Exact search of one chunk with torch matmuls of one fixed shape and a top-k per row block.

    BLAS and cuBLAS pick kernels by matrix shape, and a row scored in products of other shapes
    can round differently (on CPU, chunks of 2 or 3 rows did). So every score comes from a
    (query_block, D) x (D, row_block) product, with zero rows padding the queries and the chunk,
    whatever the chunk size or the number of queries.
    NOTE: the tests run this backend on CPU tensors only; no CUDA device was available to run it on a GPU.
    """

    def __init__(self, device: torch.device, query_block: int = 1024, row_block: int = 8192):
        self.device = device
        self.query_block = query_block
        self.row_block = row_block

    def prepare(self, chunk: np.ndarray) -> tuple[torch.Tensor, int]:
        num_rows = chunk.shape[0]
        padded = -(-num_rows // self.row_block) * self.row_block
        rows = torch.zeros((padded, chunk.shape[1]), dtype=torch.float32, device=self.device)
        rows[:num_rows] = torch.from_numpy(chunk).to(self.device)
        return rows, num_rows

    def search(self, prepared: tuple[torch.Tensor, int], queries: np.ndarray, depth: int
               ) -> tuple[np.ndarray, np.ndarray]:
        chunk, num_rows = prepared
        all_scores, all_rows = [], []
        block = torch.zeros((self.query_block, queries.shape[1]), dtype=torch.float32, device=self.device)
        for start in range(0, queries.shape[0], self.query_block):
            count = min(self.query_block, queries.shape[0] - start)
            block.zero_()
            block[:count] = torch.from_numpy(queries[start : start + count]).to(self.device)
            # the top `depth` of each row block, then of their union, gives the same scores as one top-k
            candidate_scores, candidate_rows = [], []
            for first in range(0, num_rows, self.row_block):
                valid = min(self.row_block, num_rows - first)
                scores = (block @ chunk[first : first + self.row_block].T)[:count, :valid]  # (count, valid)
                top_scores, top_rows = torch.topk(scores, min(depth, valid), dim=1)
                candidate_scores.append(top_scores)
                candidate_rows.append(top_rows + first)
            scores, picked = torch.topk(torch.cat(candidate_scores, dim=1), depth, dim=1)  # (count, depth)
            rows = torch.cat(candidate_rows, dim=1).gather(1, picked)
            all_scores.append(scores.cpu().numpy())
            all_rows.append(rows.cpu().numpy())
        return np.concatenate(all_scores), np.concatenate(all_rows).astype(np.int64)


def _sort_ties(scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row of results by score descending, then database row ascending."""
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def _exact_chunk_topk(
    queries: np.ndarray, chunk: np.ndarray, k: int, backend
) -> tuple[np.ndarray, np.ndarray]:
    """Return the top min(k, n) chunk rows per query, ordered by (-score, row).

    The rows are chunk-local. The fetched candidates decide the cut exactly when the k-th
    score is strictly above the deepest fetched score, because every row scoring at least
    the k-th score is then among them.
    """
    n = chunk.shape[0]
    k = min(k, n)
    depth = min(n, k + max(_MIN_EXTRA_DEPTH, k // 8))
    prepared = backend.prepare(chunk)

    scores, rows = _sort_ties(*backend.search(prepared, queries, depth))
    best_scores, best_rows = scores[:, :k].copy(), rows[:, :k].copy()
    pending = np.flatnonzero(scores[:, k - 1] == scores[:, depth - 1]) if depth < n else np.array([], np.int64)

    # queries with ties across the cut: search deeper until the cut is strict or the chunk is exhausted
    while pending.size:
        depth = min(n, 2 * depth)
        still_tied = []
        block = max(1, _RESEARCH_BLOCK_ELEMENTS // depth)
        for start in range(0, pending.size, block):
            subset = pending[start : start + block]
            scores, rows = _sort_ties(*backend.search(prepared, queries[subset], depth))
            best_scores[subset], best_rows[subset] = scores[:, :k], rows[:, :k]
            still_tied.append(subset[scores[:, k - 1] == scores[:, depth - 1]])
        pending = np.concatenate(still_tied) if depth < n else np.array([], np.int64)
    return best_scores, best_rows


def knn_search(
    queries: np.ndarray,
    database_chunks: Iterable[np.ndarray],
    k: int,
    device: str | torch.device = "cpu",
    exclude_self: bool = False,
    total_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the top-k database rows for each query by inner product.

    `database_chunks` yields (n_i, D) arrays and row numbers count across chunks.
    With `exclude_self`, query i and database row i are the same image and that row
    is never returned. `total_rows` only sizes the progress bar.

    Returns:
        Scores (Q, k) float32 and rows (Q, k) int64, ordered by score descending and then
        by lower row, padded with -inf and -1 when the database has fewer than k rows to return.

    Raises:
        ValueError: `k` is below 1, or a chunk's dimension differs from the queries'.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = torch.device(device)
    backend = _TorchBackend(device) if device.type == "cuda" else _FaissBackend()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_queries = queries.shape[0]
    query_rows = np.arange(num_queries)[:, None]  # (Q, 1)

    # one extra per chunk, because the query's own row may take a place in the chunk's top k
    chunk_k = k + 1 if exclude_self else k

    best_scores = np.full((num_queries, 0), -np.inf, dtype=np.float32)
    best_rows = np.full((num_queries, 0), -1, dtype=np.int64)
    offset = 0
    bar = tqdm(total=total_rows, desc="kNN search", unit="rows", leave=False, disable=None)
    for chunk in database_chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != queries.shape[1]:
            raise ValueError(
                f"database chunk has shape {chunk.shape}, expected (rows, {queries.shape[1]}) like the queries"
            )
        if chunk.shape[0] == 0:
            continue
        scores, rows = _exact_chunk_topk(queries, chunk, chunk_k, backend)
        rows = rows + offset

        # merge with the running top-k, dropping each query's own row
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, rows], axis=1)
        if exclude_self:
            is_self = rows == query_rows
            scores = np.where(is_self, -np.inf, scores)
            rows = np.where(is_self, -1, rows)
        scores, rows = _sort_ties(scores, np.where(rows < 0, _NO_ROW, rows))
        rows = np.where(rows == _NO_ROW, -1, rows)
        best_scores, best_rows = scores[:, :k], rows[:, :k]

        offset += chunk.shape[0]
        bar.update(chunk.shape[0])
    bar.close()

    if best_rows.shape[1] < k:
        pad = k - best_rows.shape[1]
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
    return best_scores.astype(np.float32), best_rows


def iterate_chunks(
    array, chunk_rows: int = DEFAULT_CHUNK_ROWS, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks of an array or HDF5 dataset, optionally transformed.

    An HDF5 dataset is read one block at a time, so only one block is in memory.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    for start in range(0, array.shape[0], chunk_rows):
        block = np.asarray(array[start : start + chunk_rows])
        yield transform(block) if transform is not None else block
