"""The k largest entries of each row, in descending order with ties to the lower index, without sorting
the whole row (a stable descending sort's first k: equal scores keep the anchor order, as the references do).

Two exact shortcuts replace the sort: (1) each score becomes an int64 key that orders like it, with the index
packed below, so torch.topk has one answer, the sort's; (2) the row is cut into chunks ranked by their maximum:
every entry of the top k lies in the top k chunks (an entry outside has k chunks ahead, each holding an entry
ranked ahead of it), so the top k of those k * chunk entries is the answer.
"""

from __future__ import annotations

import torch

_INDEX_BITS = 31  # rows of up to 2**31 entries; 32 bits of score above them fit an int64
_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def exporting() -> bool:
    """Whether torch.export is tracing the caller (torch.compiler.is_exporting, torch >= 2.6; never before)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def order_preserving_int(x: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 keys in [0, 2**32), x's shape, with a < b exactly when float a < float b.
    -0.0 and 0.0 map to one value, and every NaN to one value above +inf (torch.sort's descending order
    puts NaN first)."""
    x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x + 0.0)  # one NaN; -0.0 + 0.0 = +0.0
    bits = x.view(torch.int32).to(torch.int64)
    # Non-negative floats already order as their bit patterns; negative ones in reverse, so flip their
    # magnitude bits. Then shift the signed range up to start at 0.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def _top_k_keyed(values: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (along dim 1) of the k entries of values [B, m] ranked first by (value descending, index
    ascending), in that order; index [B, m] or [m]: distinct non-negative int64 below 2**31."""
    packed = (order_preserving_int(values.float()) << _INDEX_BITS) | ((2**_INDEX_BITS - 1) - index)
    return torch.topk(packed, k, dim=1, largest=True, sorted=True).indices


def top_k_sorted_indices(key: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """int64 [B, min(k, n)]: torch.sort(key [B, n], dim=1, descending=True, stable=True).indices[:, :k], by the
    module docstring's shortcuts for float keys (chunks of `chunk`, <= 1: none, past 4 * k * chunk entries).
    Other dtypes, rows of 2**31 entries or more, and torch.export (ONNX opsets < 26 cannot view a float's bits)
    use the stable sort."""
    batch, n = key.shape
    k = min(int(k), n)
    if key.dtype not in _KEY_DTYPES or n >= 2**_INDEX_BITS or exporting():
        return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    positions = torch.arange(n, device=key.device, dtype=torch.int64)
    if chunk <= 1 or n <= 4 * k * chunk:
        return _top_k_keyed(key, positions, k)
    chunks = -(-n // chunk)
    # -inf padding ranks after every real entry: below larger values, and after a real -inf by index.
    padded = torch.nn.functional.pad(key, (0, chunks * chunk - n), value=float("-inf")).view(batch, chunks, chunk)
    best_chunks = _top_k_keyed(padded.amax(dim=2), positions[:chunks], k)  # [B, k]
    members = (best_chunks.unsqueeze(-1) * chunk + positions[:chunk]).reshape(batch, k * chunk)
    chosen = _top_k_keyed(padded.reshape(batch, chunks * chunk).gather(1, members), members, k)
    return members.gather(1, chosen)
