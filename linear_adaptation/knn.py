"""Exact inner-product kNN search over a database streamed in chunks.

On CPU each database chunk goes through a faiss `IndexFlatIP`; on CUDA through a
torch matmul and top-k. Partial top-k lists are merged chunk by chunk, so memory is
bounded by one chunk plus the (Q, k) results. Ties are broken by the lower database
row, so results do not depend on the backend or the chunking.
"""
import logging
from collections.abc import Iterable

import faiss
import numpy as np
import torch
from tqdm import tqdm

_logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 65536


def _topk_chunk(
    queries: np.ndarray, chunk: np.ndarray, k: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, chunk.shape[0])
    if device.type == "cuda":
        q = torch.from_numpy(queries).to(device)
        d = torch.from_numpy(chunk).to(device)
        scores, idx = torch.topk(q @ d.T, k, dim=1)
        return scores.float().cpu().numpy(), idx.cpu().numpy()
    index = faiss.IndexFlatIP(chunk.shape[1])
    index.add(chunk)
    return index.search(queries, k)


def _sort_ties(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, then database row ascending."""
    order = np.lexsort((indices, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


def knn_search(
    queries: np.ndarray,
    database_chunks: Iterable[np.ndarray],
    k: int,
    device: str | torch.device = "cpu",
    exclude_self: bool = False,
    total_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the top-k database rows for each query by inner product.

    `database_chunks` yields (n_i, D) arrays; row numbers count across chunks.
    With `exclude_self`, query i and database row i are the same image and that row
    is never returned. Returns scores (Q, k) float32 and rows (Q, k) int64, padded
    with -inf and -1 when the database has fewer than k other rows.
    """
    device = torch.device(device)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_queries = queries.shape[0]
    search_k = k + 1 if exclude_self else k

    best_scores = np.full((num_queries, 0), -np.inf, dtype=np.float32)
    best_rows = np.full((num_queries, 0), -1, dtype=np.int64)
    offset = 0
    bar = tqdm(total=total_rows, desc="kNN search", unit="rows", leave=False, disable=None)
    for chunk in database_chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.shape[1] != queries.shape[1]:
            raise ValueError(
                f"database dimension {chunk.shape[1]} does not match query dimension {queries.shape[1]}"
            )
        scores, rows = _topk_chunk(queries, chunk, search_k, device)
        rows = rows.astype(np.int64) + offset

        # merge with the running top-k
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, rows], axis=1)
        if exclude_self:
            is_self = rows == np.arange(num_queries)[:, None]
            scores = np.where(is_self, -np.inf, scores)
            rows = np.where(is_self, -1, rows)
        scores, rows = _sort_ties(scores, np.where(rows < 0, np.iinfo(np.int64).max, rows))
        rows = np.where(rows == np.iinfo(np.int64).max, -1, rows)
        best_scores, best_rows = scores[:, :k], rows[:, :k]

        offset += chunk.shape[0]
        bar.update(chunk.shape[0])
    bar.close()

    if best_rows.shape[1] < k:
        pad = k - best_rows.shape[1]
        best_scores = np.pad(best_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
    return best_scores.astype(np.float32), best_rows


def iterate_chunks(array, chunk_rows: int = DEFAULT_CHUNK_ROWS, transform=None):
    """Yield consecutive row blocks of an array or HDF5 dataset, optionally transformed."""
    for start in range(0, array.shape[0], chunk_rows):
        block = np.asarray(array[start : start + chunk_rows])
        yield transform(block) if transform is not None else block
