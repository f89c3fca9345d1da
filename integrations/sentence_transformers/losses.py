"""sentence-transformers drop-ins: `SmoothMultipleNegativesRankingLoss` and
`CachedSmoothMultipleNegativesRankingLoss`, subclasses of the library's
``MultipleNegativesRankingLoss`` and ``CachedMultipleNegativesRankingLoss`` computing smoothed InfoNCE
through the core (`smooth_infonce.functional.compute_loss`).

Swap one line and a sentence-transformers training script runs unchanged::

    # loss = MultipleNegativesRankingLoss(model, scale=20.0)
    loss = SmoothMultipleNegativesRankingLoss(model, scale=20.0, smoothing=0.1, neighbors=5)

The cached variant subclasses the library's cached class and overrides only ``calculate_loss``, the
loss over the whole batch's embeddings: the library keeps its own gradient cache (its mini-batches,
RNG replay and DDP handling) and nothing of it is copied here. The project's own cached-gradient
step (`smooth_infonce.cached_step`) drives encoders it is handed as callables; here the library's
trainer calls ``loss(features, labels)`` and expects the library's hooks, so reusing its class is
the one way that changes nothing else.

Imports in this module are absolute: ``import sentence_transformers`` is the real package, not
this subpackage.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:
    from sentence_transformers import util as st_util
    try:  # 6.x: the losses live under sentence_transformers.sentence_transformer.losses
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # 5.x
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
except ImportError as err:
    raise ImportError(f"smooth_infonce.integrations.sentence_transformers needs sentence-transformers: pip install "
                      f"'smooth-infonce[sentence-transformers]' ({err})") from err

from smooth_infonce import distributed
from smooth_infonce.functional import compute_loss
from smooth_infonce.layout import NO_ID
from smooth_infonce.options import LossOptions, ScheduledSmoothing
from smooth_infonce.schedule import SmoothingSchedule
from smooth_infonce.validation import check_embeddings, check_finite, check_same_device, check_smoothing

QUERY_TO_DOC, DOC_TO_QUERY = "query_to_doc", "doc_to_query"
# similarity_fct -> whether the core L2-normalises (cos_sim) or takes the embeddings as they are (dot_score)
NORMALIZES = {st_util.cos_sim: True, st_util.pytorch_cos_sim: True, st_util.dot_score: False}


def normalizes(similarity_fct) -> bool:
    """Whether ``similarity_fct`` is the cosine (True) or the dot product (False); any other
    similarity is refused, naming the argument and what is supported."""
    try:
        return NORMALIZES[similarity_fct]
    except (KeyError, TypeError):
        name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
        raise ValueError(f"similarity_fct={name} is not supported by the smoothed loss: use "
                         "sentence_transformers.util.cos_sim (the default) or util.dot_score") from None


def check_supported(loss) -> bool:
    """Refuse, naming the argument, every setting of the library's loss that the smoothed loss does
    not compute as the library does at smoothing 0; returns whether the loss is symmetric."""
    normalizes(loss.similarity_fct)
    directions = tuple(getattr(loss, "directions", (QUERY_TO_DOC,)))  # 5.x has only query_to_doc
    partition_mode = getattr(loss, "partition_mode", "joint")
    other = sorted(set(directions) - {QUERY_TO_DOC, DOC_TO_QUERY})
    if other:
        raise ValueError(f"directions={directions}: {other} (same-type negatives, the GTE loss) are not supported "
                         "by the smoothed loss; use ('query_to_doc',) or ('query_to_doc', 'doc_to_query')")
    symmetric = DOC_TO_QUERY in directions
    if symmetric and partition_mode != "per_direction":
        raise ValueError(f"directions={directions} with partition_mode={partition_mode!r} (one softmax over both "
                         "directions' scores) is not supported by the smoothed loss; use "
                         "partition_mode='per_direction' (the mean of the two directions' losses)")
    hardness_mode = getattr(loss, "hardness_mode", None)
    if hardness_mode is not None and getattr(loss, "hardness_strength", 0.0) > 0:
        raise ValueError(f"hardness_mode={hardness_mode!r} with hardness_strength > 0 is not supported by the "
                         "smoothed loss (smoothing and hardness weighting both reshape the negatives' share; "
                         "pick one): use hardness_mode=None")
    return symmetric


class _Smoothing(ScheduledSmoothing):
    """The smoothing shared by both drop-ins: its options, the scheduled alpha, the checks and the
    loss of some anchor rows of the batch (all of them, or one mini-batch of the cached loss)."""

    def _init_smoothing(self, smoothing, neighbors, schedule, backend, deterministic, allow_tf32, few_negatives,
                        validate) -> None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool, got {validate!r}")
        # temperature (1 / scale) and normalize (from similarity_fct) are read at each call
        self.options = LossOptions(smoothing=smoothing, neighbors=neighbors, schedule=schedule, backend=backend,
                                   deterministic=deterministic, allow_tf32=allow_tf32, few_negatives=few_negatives)
        self.smoothing = self.options.initial_smoothing  # the current alpha: the one thing that moves
        self.validate = validate
        self._call_options: Optional[Tuple[tuple, LossOptions]] = None
        check_supported(self)

    def get_config_dict(self) -> Dict[str, Any]:
        return {**super().get_config_dict(), "smoothing": self.smoothing, "neighbors": self.neighbors}

    def _options_now(self) -> LossOptions:
        key = (1.0 / self.scale, normalizes(self.similarity_fct), self.options)
        if self._call_options is None or self._call_options[0] != key:
            self._call_options = (key, self.options.replace(temperature=key[0], normalize=key[1]))
        return self._call_options[1]

    def _prepare(self, embeddings: Sequence[Tensor]) -> "_Batch":
        """Check the columns (queries, positives, hard negatives) and gather them across ranks."""
        if len(embeddings) < 2:
            raise ValueError(f"expected at least 2 columns (anchor, positive, hard negatives...), "
                             f"got {len(embeddings)}")
        symmetric = check_supported(self)  # the settings are assignable attributes: checked at each call
        queries, docs = embeddings[0], list(embeddings[1:])
        check_embeddings("anchor embeddings (column 0)", queries)
        for c, doc in enumerate(docs, start=1):
            check_embeddings(f"embeddings of column {c}", doc, width=queries.shape[1], rows=queries.shape[0])
        check_same_device(**{f"column_{c}": x for c, x in enumerate(embeddings)})
        if self.validate:
            check_finite(**{f"column_{c}": x for c, x in enumerate(embeddings)})
        batch, offset = queries.shape[0], 0
        all_queries, all_docs = queries, docs
        if self.gather_across_devices and distributed.world_size() > 1:
            # every rank's columns, gradients flowing back to their owners (the core's gather; the
            # library's all_gather_with_grad does the same); this rank's rows come at rank * batch
            if self.validate:
                distributed.check_equal_batch(batch)
            all_docs = [distributed.gather_with_grad(doc) for doc in docs]
            all_queries = distributed.gather_with_grad(queries) if symmetric else None
            offset = distributed.rank() * batch
        world_batch = all_docs[0].shape[0]
        device = queries.device
        # candidates: every rank's positives, then each hard-negative column of every rank (-1: never a positive)
        candidate_ids = torch.cat([torch.arange(world_batch, device=device),
                                   torch.full((world_batch * (len(docs) - 1),), NO_ID, dtype=torch.long,
                                              device=device)])
        return _Batch(queries, docs[0], all_queries, torch.cat(all_docs), candidate_ids, offset, symmetric)

    def _rows_loss(self, batch: "_Batch", rows: slice) -> Tensor:
        """The mean loss of anchor rows ``rows`` of this rank (MNRL's row losses, smoothed)."""
        options, alpha = self._options_now(), check_smoothing(self.smoothing)
        ids = torch.arange(batch.offset + rows.start, batch.offset + rows.stop, device=batch.queries.device)
        loss = compute_loss(batch.queries[rows], batch.candidates, ids=ids, candidate_ids=batch.candidate_ids,
                            options=options, smoothing=alpha, validate=self.validate)
        if not batch.symmetric:
            return loss
        # doc_to_query, partition_mode="per_direction": each positive against every query, averaged
        query_ids = torch.arange(batch.all_queries.shape[0], device=batch.queries.device)
        backward = compute_loss(batch.positives[rows], batch.all_queries, ids=ids, candidate_ids=query_ids,
                                options=options, smoothing=alpha, validate=self.validate)
        return (loss + backward) / 2


class _Batch:
    """One batch's columns as the loss sees them: this rank's queries and positives, and the
    gathered queries (symmetric only) and candidates with their ids."""

    def __init__(self, queries, positives, all_queries, candidates, candidate_ids, offset, symmetric):
        self.queries, self.positives, self.all_queries = queries, positives, all_queries
        self.candidates, self.candidate_ids, self.offset, self.symmetric = candidates, candidate_ids, offset, symmetric


_SMOOTHING_ARGS = """
    Args (beyond the library's, which are passed through unchanged):
        smoothing: alpha in [0, 1), the target mass moved from each positive onto its neighbours.
        neighbors: k >= 1 (the k candidates most similar to the anchor among its negatives: the
            other rows' positives and every hard negative), or None (all of them).
        schedule: a `SmoothingSchedule` (alpha per epoch; replaces ``smoothing``): call
            ``set_epoch(epoch)`` each epoch. Before that, alpha is the schedule's epoch-0 value.
        backend, deterministic, allow_tf32: where the loss runs (`smooth_infonce.LossOptions`):
            "auto" takes the fused Triton kernel for CUDA tensors, the reference op elsewhere.
        few_negatives: "use_all" (default): a row with fewer than k negatives smooths onto all of
            them; "raise" makes it an error.
        validate: value checks that read back from the device (finite embeddings, counts).
"""


class SmoothMultipleNegativesRankingLoss(_Smoothing, MultipleNegativesRankingLoss):
    """Smoothed InfoNCE as a drop-in subclass of sentence-transformers' `MultipleNegativesRankingLoss`.

    Same constructor (the library's arguments, passed through: ``model, scale=20.0,
    similarity_fct=cos_sim, gather_across_devices=False`` and, from 6.x, ``directions``,
    ``partition_mode``, ``hardness_mode``, ``hardness_strength``) and call (``loss(features,
    labels)``, or ``compute_loss_from_embeddings(embeddings, labels)``), plus the smoothing. The
    columns are (anchor, positive, hard negative 1, ...); for anchor i, with tau = 1 / ``scale``
    and the candidates c = every positive and every hard negative of the batch (of every rank with
    ``gather_across_devices``):

        z_ij = sim(a_i, c_j) / tau     (cos_sim: unit vectors; dot_score: as given)
        y_ij = 1 - alpha on its positive, alpha / k on the k negatives most similar to a_i
               (``neighbors=None``: alpha spread over every negative), 0 elsewhere
        loss = mean_i -sum_j y_ij log softmax_j(z_ij)                       (query_to_doc)

    With ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`` (the
    library's symmetric InfoNCE) the loss is the mean of that and the positives-to-queries loss,
    each direction smoothing onto its own neighbours (docs/loss.md). At ``smoothing=0`` it is the
    library's loss: the same value and gradients of every column (tested in float64).

    Refused with an error naming the setting (nothing is silently different): a similarity other
    than ``util.cos_sim`` / ``util.dot_score``; the ``query_to_query`` and ``doc_to_doc`` directions;
    ``doc_to_query`` with ``partition_mode="joint"``; ``hardness_mode`` with a positive
    ``hardness_strength``. The settings stay assignable attributes and are checked at each call.
    ``partition_mode`` is either with ``("query_to_doc",)`` (one direction: the same loss).
    """ + _SMOOTHING_ARGS + """
    Example:
        >>> import torch
        >>> from sentence_transformers import SentenceTransformer
        >>> from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        >>> from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from smooth_infonce.integrations.sentence_transformers import SmoothMultipleNegativesRankingLoss
        >>> words = ["a", "cat", "dog", "sits", "runs", "the", "mat", "park"]
        >>> tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, "[UNK]"))
        >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=16)], device="cpu")
        >>> loss = SmoothMultipleNegativesRankingLoss(model, scale=20.0, smoothing=0.1, neighbors=2)
        >>> isinstance(loss, MultipleNegativesRankingLoss)
        True
        >>> columns = [torch.randn(6, 16, requires_grad=True) for _ in range(3)]  # anchor, positive, negative
        >>> value = loss.compute_loss_from_embeddings(columns, None)
        >>> value.backward()
        >>> plain = SmoothMultipleNegativesRankingLoss(model)               # smoothing=0: the library's loss
        >>> bool(torch.isclose(plain.compute_loss_from_embeddings(columns, None),
        ...                    MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(columns, None)))
        True
    """

    def __init__(
        self,
        model,
        *args: Any,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        schedule: Optional[SmoothingSchedule] = None,
        backend: str = "auto",
        deterministic: bool = False,
        allow_tf32: Optional[bool] = None,
        few_negatives: str = "use_all",
        validate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)  # the library validates its own arguments
        self._init_smoothing(smoothing, neighbors, schedule, backend, deterministic, allow_tf32, few_negatives,
                             validate)

    def compute_loss_from_embeddings(self, embeddings: List[Tensor], labels: Optional[Tensor] = None) -> Tensor:
        batch = self._prepare(embeddings)
        return self._rows_loss(batch, slice(0, batch.queries.shape[0]))


class CachedSmoothMultipleNegativesRankingLoss(_Smoothing, CachedMultipleNegativesRankingLoss):
    """Smoothed InfoNCE as a drop-in subclass of sentence-transformers'
    `CachedMultipleNegativesRankingLoss` (GradCache): the loss of
    `SmoothMultipleNegativesRankingLoss`, with the library's gradient cache.

    Same constructor (the library's arguments passed through: ``mini_batch_size``,
    ``show_progress_bar``, ...) and call, plus the smoothing; the same settings are refused. Only
    ``calculate_loss`` (the loss over the whole batch's cached embeddings) is overridden: the
    library embeds the batch without a graph, this computes the loss ``mini_batch_size`` anchor
    rows at a time against every candidate (each mini-batch back-propagated at once, so the
    loss's memory is that of one mini-batch's rows) and the library replays the encoder with the
    cached gradients. The rows' losses do not depend on how they are split, so the value and the
    gradients are those of the uncached loss (to float rounding; tested in float64).
    """ + _SMOOTHING_ARGS

    def __init__(
        self,
        model,
        *args: Any,
        smoothing: float = 0.0,
        neighbors: Optional[int] = None,
        schedule: Optional[SmoothingSchedule] = None,
        backend: str = "auto",
        deterministic: bool = False,
        allow_tf32: Optional[bool] = None,
        few_negatives: str = "use_all",
        validate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        self._init_smoothing(smoothing, neighbors, schedule, backend, deterministic, allow_tf32, few_negatives,
                             validate)

    def calculate_loss(self, reps: List[List[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the whole batch from the mini-batches' cached embeddings, ``mini_batch_size``
        anchor rows at a time; with ``with_backward`` each part is back-propagated into the
        embeddings at once and the detached total is returned (the library's contract)."""
        batch = self._prepare([torch.cat(column) for column in reps])
        rows = batch.queries.shape[0]
        parts = []
        for begin in range(0, rows, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, rows)
            part = self._rows_loss(batch, slice(begin, end)) * ((end - begin) / rows)
            if with_backward:
                # the gathered candidates' graph is shared by every part: kept until the last one
                part.backward(retain_graph=end < rows)
                part = part.detach()
            parts.append(part)
        return sum(parts)
