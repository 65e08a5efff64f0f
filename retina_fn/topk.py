"""The k largest entries of each row, in descending order with ties to the lower index, without sorting
the whole row (a stable descending sort's first k: equal scores keep the anchor order, as the references do).

Two exact shortcuts replace the sort:
1. Collision-free keys. Each float32 score becomes an int64 that orders like the score, with the entry's
   index packed below it so that equal scores order by index; torch.topk on the keys then has exactly
   one answer, the sort's.
2. Chunks. Cut the row into contiguous chunks and rank the chunks by their maximum (ties to the lower
   chunk). Every entry of the top k lies in one of the top k chunks: an entry outside them has k chunks
   ranked ahead of its own, and each of those holds an entry ranked ahead of it (a larger score, or an
   equal score at a lower index). So the top k of the k * chunk entries of those chunks is the answer.
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
    """torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k], computed as the module docstring
    says for float32, float16 and bfloat16 keys (chunks of `chunk` entries, <= 1: none, when a row holds more
    than 4 * k * chunk entries). Other dtypes, rows of 2**31 entries or more, and tracing by torch.export use
    the stable sort (an exported program may become ONNX, whose opsets before 26 cannot view a float's bits).

    Args:
      key: [B, n], any dtype torch.sort takes.
      k: how many indices per row; more than n gives n.

    Returns:
      int64 [B, min(k, n)], positions along dim 1.
    """
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
