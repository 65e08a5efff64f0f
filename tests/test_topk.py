"""Top-k with a stable sort's tie order, against torch.sort(stable=True) and hand cases."""

import pytest
import torch

from retina_fn.topk import order_preserving_int, top_k_sorted_indices


def stable_reference(key, k):
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]


def test_hand_case_ties_go_to_the_lower_index():
    key = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    assert top_k_sorted_indices(key, 4).tolist() == [[1, 3, 0, 2]]


def test_order_preserving_int_orders_like_the_floats():
    values = [float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 0.25, 7.0, float("inf")]
    keys = order_preserving_int(torch.tensor(values)).tolist()
    assert keys[3] == keys[4]  # -0.0 == 0.0
    distinct = keys[:3] + keys[4:]
    assert all(a < b for a, b in zip(distinct, distinct[1:]))
    nan = order_preserving_int(torch.tensor([float("nan"), -float("nan")])).tolist()
    assert nan[0] == nan[1] > keys[-1]
    assert min(keys) >= 0 and max(nan) < 2**32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_matches_the_stable_sort_with_many_ties_and_special_values(dtype):
    g = torch.Generator().manual_seed(0)
    key = (torch.randint(0, 7, (3, 500), generator=g).to(torch.float32) / 4 - 0.5).to(dtype)
    key[0, ::17] = float("-inf")
    key[1, ::23] = float("nan")
    key[2, ::5] = -0.0
    key[2, 1::5] = 0.0
    for k in (1, 10, 137, 500, 800):
        assert torch.equal(top_k_sorted_indices(key, k), stable_reference(key, k)), k


def test_matches_on_continuous_scores_and_mostly_masked_rows():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 20000, generator=g)
    masked = torch.where(scores > 0.999, scores, torch.full_like(scores, float("-inf")))
    for key in (scores, masked):
        assert torch.equal(top_k_sorted_indices(key, 1000), stable_reference(key, 1000))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_selection_is_exact_with_ties_across_chunks(chunk):
    g = torch.Generator().manual_seed(2)
    # few distinct values: whole chunks tie on their maximum, and the k-th value ties beyond k
    key = torch.randint(0, 5, (4, 3001), generator=g).to(torch.float32)
    key[0] = float("-inf")
    key[0, 2990:] = 1.0  # the only finite entries sit in the last, partly padded chunk
    key[1, ::7] = float("nan")
    key[2, :1500] = float("-inf")
    for k in (1, 5, 40, 3001):
        assert torch.equal(top_k_sorted_indices(key, k, chunk=chunk), stable_reference(key, k)), (chunk, k)


def test_detection_sized_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 36864 * 91, generator=g) * 3 - 4
    scores = torch.sigmoid(logits)
    key = torch.where(scores > 0.05, scores, torch.full_like(scores, float("-inf")))
    assert torch.equal(top_k_sorted_indices(key, 1000), stable_reference(key, 1000))
