"""Which pairs a row compares: the valid set V(i) and the positive set P(i) (docs/loss.md).

Every toolkit layout (SimCLR / NT-Xent, multi-crop, SupCon ids, MoCo, two-tower) reduces to one
`Pairs` description over an anchor matrix (N x D) and a candidate matrix (M x D):

- candidate j is a positive of row i when ``candidate_ids[j] == anchor_ids[i]``
  (``candidate_ids[j] == -1`` never matches: queue entries); with ``ids_exclude`` (the MoCo queue
  with sample ids) a matching candidate is instead left out of V(i): it is the query's own image,
  a certain false negative;
- column ``i + self_offset`` is not in V(i) (the anchor itself in the in-batch layout);
- an optional extra column 0 holds the MoCo positive ``<a_i, k_i>``, outside the candidate matrix.

Both backends (the reference and the Triton kernel) consume this same description, so a layout is
defined once. The counts |P(i)| and |Neg(i)| are computed here in O((N + M) log M) without any
N x M mask, so the kernel path never builds one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import distributed

NO_ID = -1  # candidate id that matches no anchor: a negative for every row


@dataclass(frozen=True)
class Pairs:
    """Valid and positive pairs of an N x M problem, plus their per-row counts."""

    anchor_ids: Optional[Tensor]  # (N,) int64, >= 0
    candidate_ids: Optional[Tensor]  # (M,) int64, NO_ID or >= 0
    self_offset: Optional[int]  # column i + self_offset is excluded from row i
    has_positive_key: bool  # an extra positive column 0 (MoCo), not in the candidate matrix
    ids_exclude: bool  # equal ids mean "not a candidate of this row" instead of "a positive"
    num_positives: Tensor  # (N,) int64: |P(i)|
    num_negatives: Tensor  # (N,) int64: |Neg(i)| = |V(i)| - |P(i)|


def make_pairs(
    num_anchors: int,
    num_candidates: int,
    *,
    anchor_ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
    self_offset: Optional[int] = None,
    has_positive_key: bool = False,
    ids_exclude: bool = False,
    device: torch.device | str = "cpu",
) -> Pairs:
    """Describe a layout and count its positives and negatives per row (no N x M memory)."""
    n, m = num_anchors, num_candidates
    rows = torch.arange(n, device=device)
    if anchor_ids is not None and candidate_ids is not None:
        # |{j : cand_id[j] == anchor_id[i]}| by binary search in the sorted candidate ids.
        sorted_ids = torch.sort(candidate_ids).values
        matches = torch.searchsorted(sorted_ids, anchor_ids, right=True) - torch.searchsorted(
            sorted_ids, anchor_ids, right=False
        )
    else:
        matches = torch.zeros(n, dtype=torch.long, device=device)
    valid = torch.full((n,), m, dtype=torch.long, device=device)
    if self_offset is not None:
        self_col = rows + self_offset
        has_self = (self_col >= 0) & (self_col < m)
        valid = valid - has_self.long()
        if anchor_ids is not None and candidate_ids is not None:
            self_id = candidate_ids[self_col.clamp(0, max(m - 1, 0))] if m > 0 else anchor_ids
            matches = matches - (has_self & (self_id == anchor_ids)).long()
    if ids_exclude:  # matching candidates leave V(i) instead of joining P(i)
        valid, matches = valid - matches, torch.zeros_like(matches)
    positives = matches + int(has_positive_key)
    valid = valid + int(has_positive_key)
    return Pairs(
        anchor_ids=anchor_ids,
        candidate_ids=candidate_ids,
        self_offset=self_offset,
        has_positive_key=has_positive_key,
        ids_exclude=ids_exclude,
        num_positives=positives,
        num_negatives=valid - positives,
    )


def dense_masks(pairs: Pairs, n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (valid, positive) boolean N x M' masks, M' = M (+1 with a positive key column first).

    Only for the reference op and tests: this is exactly the N x M memory the kernel avoids.
    """
    columns = torch.arange(m, device=device)
    if pairs.self_offset is not None:  # by comparison, not indexing: no data-dependent shapes
        valid = columns[None, :] != (torch.arange(n, device=device) + pairs.self_offset)[:, None]
    else:
        valid = torch.ones(n, m, dtype=torch.bool, device=device)
    if pairs.anchor_ids is not None and pairs.candidate_ids is not None:
        same = pairs.anchor_ids[:, None] == pairs.candidate_ids[None, :]
        if pairs.ids_exclude:
            valid &= ~same
            positive = torch.zeros(n, m, dtype=torch.bool, device=device)
        else:
            positive = same & valid
    else:
        positive = torch.zeros(n, m, dtype=torch.bool, device=device)
    if pairs.has_positive_key:
        first = torch.ones(n, 1, dtype=torch.bool, device=device)
        valid = torch.cat([first, valid], dim=1)
        positive = torch.cat([first, positive], dim=1)
    return valid, positive


LAYOUTS = ("in_batch", "moco", "two_tower")


@dataclass(frozen=True)
class Layout:
    """One resolved direction of a loss call: what the backend receives.

    ``kind`` is "in_batch" (the anchors are the candidates, each row minus itself), "moco" (a
    positive key per row, the queue as candidates) or "two_tower" (separate candidates, row i's
    positive column i unless ids say otherwise). Across ranks the candidates are the gathered ones,
    and ``pairs`` already carries this rank's offsets.
    """

    kind: str
    anchors: Tensor
    candidates: Tensor
    positive_keys: Optional[Tensor]
    pairs: Pairs


def resolve_layout(
    anchors: Tensor,
    candidates: Optional[Tensor] = None,
    *,
    ids: Optional[Tensor] = None,
    candidate_ids: Optional[Tensor] = None,
    positive_keys: Optional[Tensor] = None,
    gather_distributed: bool = False,
    check_batch: bool = True,
) -> Layout:
    """Decide the layout from which arguments are given, gather candidates across ranks if asked,
    and describe the pairs. The one place where a call's layout and rank offsets are decided.

    - ``candidates=None``: in-batch; ``ids`` (required) say which rows are views of one instance.
    - ``positive_keys``: MoCo; optional ``ids`` / ``candidate_ids`` (both or neither) leave queue
      entries with the row's own id out of its negatives (``Pairs.ids_exclude``).
    - otherwise two-tower: ``ids`` / ``candidate_ids`` (both or neither; default: row i's positive
      is column i).

    ``check_batch``: with ``gather_distributed``, check that every rank has the same batch size
    (one more collective; the validating boundary asks for it).
    """
    n, device = anchors.shape[0], anchors.device
    if candidates is None:
        if positive_keys is not None:
            raise ValueError("positive_keys (MoCo layout) needs candidates: the queue of negatives (K x D)")
        if candidate_ids is not None:
            raise ValueError("candidate_ids needs candidates; the in-batch layout uses ids for both sides")
        if ids is None:
            raise ValueError("the in-batch layout (candidates=None) needs ids: which rows are views of one instance")
        kind, candidates, candidate_ids, self_offset = "in_batch", anchors, ids, 0
    else:
        if (ids is None) != (candidate_ids is None):
            raise ValueError("pass both ids and candidate_ids, or neither")
        kind, self_offset = ("moco" if positive_keys is not None else "two_tower"), None
    positional_ids = kind == "two_tower" and ids is None  # row i's positive is column i
    if positional_ids:
        ids, candidate_ids = torch.arange(n, device=device), torch.arange(candidates.shape[0], device=device)

    # Gather the candidates of all ranks (MoCo's queue is already global). Local row i is then
    # global row rank * n + i: the self column and positional ids shift with it.
    if gather_distributed and kind != "moco" and distributed.world_size() > 1:
        if check_batch:
            distributed.check_equal_batch(candidates.shape[0])
        shift = distributed.rank() * candidates.shape[0]
        if self_offset is not None:
            self_offset = shift
        if positional_ids:
            ids, candidate_ids = ids + shift, candidate_ids + shift
        candidate_ids = distributed.gather_ids(candidate_ids)
        candidates = distributed.gather_with_grad(candidates)

    pairs = make_pairs(n, candidates.shape[0], anchor_ids=ids, candidate_ids=candidate_ids,
                       self_offset=self_offset, has_positive_key=kind == "moco",
                       ids_exclude=kind == "moco", device=device)
    return Layout(kind, anchors, candidates, positive_keys, pairs)


def check_counts(pairs: Pairs, neighbors: Optional[int], few_negatives: str) -> None:
    """Every row needs a positive; with ``few_negatives="raise"`` also a negative, and at least
    ``neighbors`` of them. Reads the counts back from the device (validating callers only)."""
    no_positive = (pairs.num_positives == 0).nonzero().flatten()
    if no_positive.numel():
        raise ValueError(
            f"{no_positive.numel()} anchor row(s) have no positive (first: row {int(no_positive[0])}); "
            "every row needs another view / a matching id"
        )
    fewest = int(pairs.num_negatives.min())
    if few_negatives == "use_all":
        if fewest == 0 or (neighbors is not None and neighbors > fewest):
            # shown once per process by Python's default warning filter: a short last batch is normal
            warnings.warn(f"a row has only {fewest} negatives (neighbors={neighbors}); few_negatives='use_all' "
                          "smooths onto all of them, and a row without negatives is plain InfoNCE (loss 0 with "
                          "one valid column)", RuntimeWarning, stacklevel=2)
        return
    if fewest == 0:
        raise ValueError("a row has no negatives (batch of one instance?): InfoNCE needs at least one negative "
                         "per row; few_negatives='use_all' makes such a row plain InfoNCE (loss 0), as lightly does")
    if neighbors is not None and neighbors > fewest:
        raise ValueError(f"neighbors={neighbors} is larger than the {fewest} negatives available to some row; "
                         "few_negatives='use_all' smooths onto all of them")
