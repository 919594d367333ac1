"""Retrieval metrics against hand-computed examples."""
import numpy as np
import pytest

from linear_adaptation.knn import iterate_chunks, knn_search
from linear_adaptation.metrics import (
    class_ids,
    labelled_set_metrics,
    per_query_metrics,
    positive_set_metrics,
    summarise,
)


def test_per_query_positives_spread_out():
    # ranks 1 and 3 relevant, 2 positives: AP = (1/1 + 2/3) / 2, MP@5 looks at the top 2
    result = per_query_metrics(np.array([[True, False, True, False]]), np.array([2]))
    assert result["map"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert result["recall@1"][0] == 1.0
    assert result["mmp@5"][0] == pytest.approx(0.5)


def test_per_query_no_positive_in_top_k():
    result = per_query_metrics(np.zeros((1, 3), dtype=bool), np.array([3]))
    assert result["map"][0] == 0.0
    assert result["recall@1"][0] == 0.0
    assert result["mmp@5"][0] == 0.0


def test_per_query_k_below_positives():
    # 10 positives but k = 3: AP is normalised by k; MP@5 needs ranks 4 and 5, which were not searched
    result = per_query_metrics(np.array([[True, False, True]]), np.array([10]))
    assert result["map"][0] == pytest.approx((1 + 2 / 3) / 3)
    assert np.isnan(result["mmp@5"][0])


def test_per_query_all_top_k_relevant():
    result = per_query_metrics(np.ones((1, 5), dtype=bool), np.array([7]))
    assert result["map"][0] == pytest.approx(1.0)
    assert result["mmp@5"][0] == pytest.approx(1.0)


def test_per_query_mp5_needs_min_5_positives_ranks():
    # Regression: with k = 1, MP@5 was recall@1 divided by min(5, positives).
    relevant = np.array([[True], [True], [False]])
    result = per_query_metrics(relevant, np.array([1, 3, 1]), k=1)
    assert result["mmp@5"][0] == 1.0
    assert np.isnan(result["mmp@5"][1])
    assert result["mmp@5"][2] == 0.0
    assert np.isnan(summarise(result, np.array([1, 3, 1]))["mmp@5"])


def test_per_query_short_list_uses_nominal_k():
    # a list cut at the 2 database rows scores as the same list padded to k = 100
    relevant = np.array([[False, True]])
    short = per_query_metrics(relevant, np.array([1]), k=100)
    padded = per_query_metrics(np.pad(relevant, ((0, 0), (0, 98))), np.array([1]), k=100)
    for name in ("map", "recall@1", "mmp@5"):
        assert short[name][0] == padded[name][0]
    assert short["map"][0] == pytest.approx(0.5)


@pytest.mark.parametrize("k", [2**63, 10**30])
def test_per_query_k_beyond_int64(k):
    # Regression: --k 2**63 overflowed in np.minimum(num_positives, k)
    relevant = np.array([[False, True, True], [True, False, False]])
    huge = per_query_metrics(relevant, np.array([2, 3]), k=k)
    nominal = per_query_metrics(relevant, np.array([2, 3]), k=1000)
    for name in ("map", "recall@1", "mmp@5"):
        np.testing.assert_array_equal(huge[name], nominal[name])
    assert huge["map"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_per_query_rejects_more_ranks_than_k():
    with pytest.raises(ValueError, match="more than k = 2"):
        per_query_metrics(np.zeros((1, 3), dtype=bool), np.array([1]), k=2)


def test_per_query_rejects_wrong_positive_shape():
    with pytest.raises(ValueError, match="num_positives has shape"):
        per_query_metrics(np.zeros((2, 3), dtype=bool), np.array([1, 2, 3]))


def test_summarise_skips_queries_without_positives():
    per_query = {"map": np.array([0.5, 1.0]), "recall@1": np.array([0.0, 1.0]), "mmp@5": np.array([1.0, 1.0])}
    summary = summarise(per_query, np.array([3, 0]))
    assert summary["map"] == pytest.approx(50.0)
    assert summary["recall@1"] == 0.0
    assert summary["num_queries"] == 1
    assert summary["queries_without_positives"] == 1


def test_class_ids_separate_domains():
    ids = class_ids(labels=np.array([0, 0, 1, 0]), domains=np.array([0, 1, 0, 0]))
    assert ids[0] == ids[3]
    assert len(set(ids.tolist())) == 3


def _six_image_set():
    # classes: rows 0-1 (d0, l0), row 2 (d0, l1) alone, rows 3-5 (d1, l0)
    labels = np.array([0, 0, 1, 0, 0, 0])
    domains = np.array([0, 0, 0, 1, 1, 1])
    ranked = np.array(
        [
            [2, 1, 3],  # AP 1/2, R@1 0, MP 0
            [0, 2, 3],  # AP 1, R@1 1, MP 1
            [0, 1, 3],  # no positive: left out
            [4, 0, 5],  # AP (1 + 2/3)/2, R@1 1, MP 1/2
            [0, 1, 2],  # AP 0
            [3, 4, -1],  # AP 1, R@1 1, MP 1; the pad is not row 0
        ]
    )
    return ranked, labels, domains


def test_labelled_set_per_domain_and_macro():
    ranked, labels, domains = _six_image_set()
    result = labelled_set_metrics(ranked, labels, domains, k=3)

    domain0, domain1 = result["per_domain"][0], result["per_domain"][1]
    assert domain0["map"] == pytest.approx(75.0)
    assert domain0["recall@1"] == pytest.approx(50.0)
    assert domain0["mmp@5"] == pytest.approx(50.0)
    assert domain0["num_queries"] == 2
    assert domain0["queries_without_positives"] == 1
    assert domain1["map"] == pytest.approx(100 * (5 / 6 + 0 + 1) / 3)
    assert domain1["recall@1"] == pytest.approx(200 / 3)
    assert domain1["mmp@5"] == pytest.approx(50.0)

    assert result["map"] == pytest.approx((75.0 + 100 * (11 / 6) / 3) / 2)
    assert result["recall@1"] == pytest.approx((50.0 + 200 / 3) / 2)
    assert result["num_queries"] == 5
    assert result["queries_without_positives"] == 1
    assert result["k"] == 3

    # micro average: the mean over the five queries with positives, whatever their domain
    assert result["all_queries"]["map"] == pytest.approx(100 * (0.5 + 1 + 5 / 6 + 0 + 1) / 5)
    assert result["all_queries"]["recall@1"] == pytest.approx(60.0)
    assert result["all_queries"]["mmp@5"] == pytest.approx(50.0)
    assert result["all_queries"]["num_queries"] == 5


def test_labelled_set_pads_narrow_ranks():
    # a list narrower than k is padded, so AP still divides by min(k, positives) = 2
    labels = np.array([0, 0, 0, 1])
    domains = np.zeros(4, dtype=int)
    ranked = np.array([[1], [0], [0], [0]])
    result = labelled_set_metrics(ranked, labels, domains, k=3)
    assert result["per_domain"][0]["map"] == pytest.approx(100 * (0.5 + 0.5 + 0.5) / 3)


def test_labelled_set_k_above_database_size():
    # 3 images, k = 10: knn pads with -1, positives are all found
    embeddings = np.eye(3, dtype=np.float32) + 0.1
    _, ranked = knn_search(embeddings, [embeddings], k=10, exclude_self=True)
    assert (ranked[:, 2:] == -1).all()
    result = labelled_set_metrics(ranked, np.zeros(3, dtype=int), np.zeros(3, dtype=int), k=10)
    assert result["map"] == pytest.approx(100.0)
    assert result["mmp@5"] == pytest.approx(100.0)


def test_labelled_set_all_queries_without_positives():
    result = labelled_set_metrics(np.array([[1], [0]]), np.array([0, 1]), np.array([0, 0]), k=1)
    assert np.isnan(result["map"])
    assert result["queries_without_positives"] == 2


def test_labelled_set_macro_mmp5_unavailable():
    # k = 3: domain 0 has a class of 5 images (4 positives > k), so its mMP@5 is n/a;
    # domain 1 has classes of 2 images. The macro average must not be domain 1's alone.
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1])
    domains = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    same_class_first = []
    for q in range(len(labels)):
        same = [r for r in range(len(labels)) if r != q and (labels[r], domains[r]) == (labels[q], domains[q])]
        other = [r for r in range(len(labels)) if r != q and r not in same]
        same_class_first.append((same + other)[:3])
    result = labelled_set_metrics(np.array(same_class_first), labels, domains, k=3)

    assert np.isnan(result["per_domain"][0]["mmp@5"])
    assert result["per_domain"][1]["mmp@5"] == pytest.approx(100.0)
    assert np.isnan(result["mmp@5"])
    assert result["map"] == pytest.approx(100.0)


def test_labelled_set_macro_skips_domain_without_positives():
    # domain 1 has a single image, so no query there has a positive
    labels = np.array([0, 0, 0])
    domains = np.array([0, 0, 1])
    ranked = np.array([[1, 2], [0, 2], [0, 1]])
    result = labelled_set_metrics(ranked, labels, domains, k=2)

    assert np.isnan(result["per_domain"][1]["map"])
    assert result["map"] == pytest.approx(100.0)
    assert result["mmp@5"] == pytest.approx(100.0)


@pytest.mark.parametrize("chunk_rows", [1, 2, 4])
def test_ties_ranked_by_lower_row(chunk_rows):
    # four identical embeddings, classes A B A B: every list is ordered by row number
    embeddings = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (4, 1))
    labels = np.array([0, 1, 0, 1])
    _, ranked = knn_search(embeddings, iterate_chunks(embeddings, chunk_rows), k=3, exclude_self=True)
    assert ranked.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]

    result = labelled_set_metrics(ranked, labels, np.zeros(4, dtype=int), k=3)
    assert result["map"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 + 1 / 2) / 4)
    assert result["recall@1"] == pytest.approx(25.0)


def test_positive_set_metrics_hand_example():
    ranked = np.array([[5, 2, -1], [0, 1, 2], [3, 4, 9]])
    positives = [np.array([2, 7]), np.array([], dtype=np.int64), np.array([9, 3, 4, 8, 1, 6])]
    result = positive_set_metrics(ranked, positives, k=3)
    # query 0: AP (1/2)/2, MP@5 1/2; query 1 has no positive; query 2: AP 1, and MP@5 needs
    # 5 ranks of which k = 3 were searched, so the mean MP@5 is not available
    assert result["map"] == pytest.approx(100 * (0.25 + 1.0) / 2)
    assert result["recall@1"] == pytest.approx(50.0)
    assert np.isnan(result["mmp@5"])
    assert positive_set_metrics(ranked[:2], positives[:2], k=3)["mmp@5"] == pytest.approx(50.0)
    assert result["num_queries"] == 2
    assert result["queries_without_positives"] == 1


def test_positive_set_metrics_count_positives_the_database_lacks():
    ranked = np.array([[5, 2, 7], [0, 1, 2]])
    positives = [np.array([2, 7]), np.array([], dtype=np.int64)]
    # query 0 lists 4 positives, 2 of them absent; query 1 lists 1, absent, so it is scored as a miss
    result = positive_set_metrics(ranked, positives, k=4, num_positives=np.array([4, 1]))
    assert result["map"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 4 + 0.0) / 2)
    assert result["mmp@5"] == pytest.approx(100 * (2 / 4 + 0.0) / 2)
    assert result["num_queries"] == 2
    assert result["queries_without_positives"] == 0
    with pytest.raises(ValueError, match="at least its positives in the database"):
        positive_set_metrics(ranked, positives, k=3, num_positives=np.array([1, 1]))


def test_positive_set_metrics_ties_share_precision():
    # query 0: the positive row 4 ties with row 2 at rank 1-2, so it gets precision 1/2 there,
    # and row 6 at rank 3 gets 2/3; the -1 pad at the end ties with nothing real.
    # query 1: the positive row 1 at rank 2 ties with ranks 1 and 3, so it gets 1/3.
    ranked = np.array([[4, 2, 6, -1], [0, 1, 3, 5]])
    scores = np.array([[0.9, 0.9, 0.5, -np.inf], [0.8, 0.8, 0.8, 0.1]], dtype=np.float32)
    positives = [np.array([4, 6]), np.array([1])]
    result = positive_set_metrics(ranked, positives, k=4, scores=scores)
    assert result["map"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + (1 / 3) / 1) / 2)
    assert result["recall@1"] == pytest.approx(50.0)
    without_scores = positive_set_metrics(ranked, positives, k=4)
    assert without_scores["map"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 2) / 1) / 2)


def test_positive_set_rows_stay_per_query():
    # row 3 is a positive of query 1 only, so it must not count for query 0
    result = positive_set_metrics(np.array([[3], [3]]), [np.array([1]), np.array([3])], k=1)
    assert result["map"] == pytest.approx(50.0)


def test_metrics_reject_bad_k():
    with pytest.raises(ValueError, match="k must be at least 1"):
        positive_set_metrics(np.array([[0]]), [np.array([0])], k=0)
