"""The policy contract (after kvpress's scorer presses): a policy scores the cached tokens of one layer of one
request; `select` keeps the observation window plus the best-scoring rest, exactly `budget` tokens per KV head.

Order. The cache is given in physical order, which may differ per KV head. "Window tokens" are the `window` tokens
with the largest logical positions of each head. Policies never see the physical order: `score`/`select` hand
`prefix_scores` a view of the layer sorted by logical position (`LayerKV.logical`), whose last `window` rows are the
window, and map the result back.

State across calls (chunked prefill, decode-time eviction). The engine calls `select` then `after_select` at every
eviction point with the kept tokens of the previous call (in the kept order) followed by the new ones. `kv.state`
holds per-token tensors [H_kv, n] (or [H, n] per query head, H a multiple of H_kv) in physical order covering the
first n <= L tokens (the tokens appended since are new); `after_select` gathers every such tensor along the kept
tokens of its KV head, so state follows its tokens through evictions.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm_restkv.scoring import kth_largest


@dataclasses.dataclass
class LayerKV:
    """One layer of one request, everything in physical (cache) order."""

    query: torch.Tensor | None  # [H, w, d] newest post-RoPE queries, oldest first (w may be < window early on)
    key: torch.Tensor  # [H_kv, L, d] cached post-RoPE keys
    value: torch.Tensor  # [H_kv, L, d]
    positions: torch.Tensor  # [H_kv, L] int64 logical positions (non-contiguous after evictions; differ per head)
    o_proj_weight: torch.Tensor | None = None  # [D, H*d]
    layer_idx: int = 0
    num_layers: int = 1
    wo_factor: torch.Tensor | None = None  # cached scoring.wo_factors(o_proj_weight, H)
    state: dict | None = None  # per (request, layer) state kept between calls
    order: torch.Tensor | None = None  # on a logical view: the physical index of each row [H_kv, L]
    # an eviction inside the prompt (a chunk boundary before its last chunk): the window queries are the prompt's
    # own text, not the question at its end; policies may score differently then (ReST-KV's chunk_* settings)
    mid_prompt: bool = False

    @property
    def length(self) -> int:
        return self.key.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[0]

    def query_positions(self) -> torch.Tensor:
        """Logical positions of the query rows: the newest w positions of the request."""
        newest = int(self.positions.max())
        w = self.query.shape[1]
        return torch.arange(newest - w + 1, newest + 1, device=self.key.device)

    def logical(self) -> LayerKV:
        """This layer with each head's rows sorted by logical position (itself when already sorted, the common
        case: compaction keeps sorted indices and new tokens append)."""
        if self.order is not None or bool((self.positions[:, 1:] > self.positions[:, :-1]).all()):
            return self
        order = self.positions.argsort(dim=1)
        rows = order[..., None].expand(-1, -1, self.key.shape[-1])
        return dataclasses.replace(self, key=self.key.gather(1, rows), value=self.value.gather(1, rows),
                                   positions=self.positions.gather(1, order), order=order)

    def to_physical(self, x: torch.Tensor) -> torch.Tensor:
        """[H_kv, L] in this view's row order -> physical order."""
        return x if self.order is None else torch.empty_like(x).scatter_(1, self.order, x)

    def carried(self, name: str, fill: float) -> torch.Tensor | None:
        """State tensor `name` in this view's row order, [H_kv, L]; tokens it does not cover yet get `fill`."""
        x = (self.state or {}).get(name)
        if x is None:
            return None
        if x.shape[1] < self.length:
            x = torch.cat([x, x.new_full((x.shape[0], self.length - x.shape[1]), fill)], dim=1)
        return x if self.order is None else x.gather(1, self.order)

    def store(self, name: str, x: torch.Tensor) -> None:
        """Keep [H_kv, L] (this view's row order) as state `name`, in physical order. No-op without state."""
        if self.state is not None:
            self.state[name] = self.to_physical(x)


class EvictionPolicy:
    """Base policy: subclasses implement `prefix_scores`; selection, order handling and state gathering live here."""

    name: ClassVar[str] = "base"
    needs_o_proj: ClassVar[bool] = False
    needs_query: ClassVar[bool] = True  # False: `kv.query` may be None
    uniform_budget: ClassVar[bool] = True  # False: keeps a per-layer count (not usable with one block table)
    # The engine's policy settings (config.POLICY_SETTINGS) this policy uses; it is built with all of them and
    # ignores the rest (the config warns when one of those is changed, report.py names runs after the used ones).
    settings: ClassVar[tuple[str, ...]] = ("window",)

    def __init__(self, window: int = 32, gqa_agg: str = "mean", **_hyperparams):
        """Unknown hyperparameters are ignored: the engine passes the same settings to every policy."""
        from vllm_restkv.scoring import GQA_MODES

        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if gqa_agg not in GQA_MODES:
            raise ValueError(f"unknown gqa_agg {gqa_agg!r}; allowed: {', '.join(GQA_MODES)}")
        self.window = window
        self.gqa_agg = gqa_agg

    def prefix_scores(self, kv: LayerKV, n: int) -> torch.Tensor:
        """[H_kv, P] importance of the P = L - window oldest tokens of a logical view (higher = keep); `n` is the
        number of them that will be kept (ReST-KV's adaptive smoothing depends on it)."""
        raise NotImplementedError

    def score(self, kv: LayerKV, budget: int | None = None) -> torch.Tensor:
        """[H_kv, L] importance in physical order, +inf on the window. Without a budget, n = P."""
        view = kv.logical()
        prefix = kv.length - self.window
        scores = torch.full((kv.num_kv_heads, kv.length), float("inf"), device=kv.key.device)
        if prefix > 0:
            part = self._prefix_scores(view, prefix if budget is None else budget - self.window)
            scores = torch.cat([part, scores[:, prefix:].to(part.dtype)], dim=1)
        return view.to_physical(scores)

    def select(self, kv: LayerKV, budget: int) -> torch.Tensor:
        """Physical indices to keep, [H_kv, min(budget, L)], sorted ascending: the window plus the top-scoring rest
        (ties go to the later position). Nothing is evicted when L <= budget."""
        if budget < self.window:
            raise ValueError(f"budget {budget} is smaller than the window {self.window}")
        h_kv, length, device = kv.num_kv_heads, kv.length, kv.key.device
        if length <= budget:
            return torch.arange(length, device=device).expand(h_kv, length).contiguous()
        view = kv.logical()
        prefix, n = length - self.window, budget - self.window
        top = top_k_latest(self._prefix_scores(view, n), n)
        kept = torch.cat([top, torch.arange(prefix, length, device=device).expand(h_kv, -1)], dim=1)
        return kept if view.order is None else view.order.gather(1, kept).sort(dim=1).values

    def after_select(self, kv: LayerKV, kept: torch.Tensor) -> None:
        """Carry per-token state along with the kept tokens: every [H_kv, L] tensor in kv.state is gathered, and
        every [H, L] one (per query head, H a multiple of H_kv) along the kept tokens of each head's KV head."""
        if not kv.state or kept.shape[1] == kv.length:  # nothing evicted: physical order unchanged
            return
        for name, x in list(kv.state.items()):
            if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] % kv.num_kv_heads == 0:
                if x.shape[1] != kv.length:
                    raise RuntimeError(f"{self.name}: state {name!r} covers {x.shape[1]} of {kv.length} tokens")
                group = x.shape[0] // kv.num_kv_heads
                kv.state[name] = x.gather(1, kept if group == 1 else kept.repeat_interleave(group, dim=0))

    def _prefix_scores(self, view: LayerKV, n: int) -> torch.Tensor:
        scores = self.prefix_scores(view, n)
        expected = (view.num_kv_heads, view.length - self.window)
        if tuple(scores.shape) != expected:
            raise RuntimeError(f"{self.name}.prefix_scores returned {tuple(scores.shape)}, expected {expected}")
        return scores


def top_k_latest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest scores per row, ascending; ties at the threshold go to the latest columns
    (exact and deterministic, unlike topk alone); NaN ranks lowest."""
    rows = scores.shape[0]
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.long, device=scores.device)
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    threshold = kth_largest(scores, k)
    at_least = scores >= threshold
    if bool((at_least.sum(dim=1) == k).all()):  # no ties cut at the threshold (the usual case)
        return at_least.nonzero()[:, 1].reshape(rows, k)
    above = scores > threshold
    tied = scores == threshold
    tied_from_right = tied.flip(1).cumsum(1).flip(1)  # tied columns at or after this one
    need = k - above.sum(dim=1, keepdim=True)
    mask = above | (tied & (tied_from_right <= need))
    return mask.nonzero()[:, 1].reshape(rows, k)
