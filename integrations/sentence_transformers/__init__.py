"""`integrations.sentence_transformers`: drop-ins for sentence-transformers (extra
``[sentence-transformers]``).

- `losses`: `SmoothMultipleNegativesRankingLoss` and `CachedSmoothMultipleNegativesRankingLoss`,
  subclasses of the library's ``MultipleNegativesRankingLoss`` and
  ``CachedMultipleNegativesRankingLoss`` with the same constructor and call plus the smoothing
  (the default and the symmetric directions; hard-negative columns; ``gather_across_devices``);
  at ``smoothing=0`` they are the library's losses (docs/sentence-transformers.md).

Imports: only the core `smooth_infonce` and sentence-transformers; importing this package without
sentence-transformers raises an ImportError that names the extra to install.
"""

from .losses import CachedSmoothMultipleNegativesRankingLoss, SmoothMultipleNegativesRankingLoss

__all__ = ["CachedSmoothMultipleNegativesRankingLoss", "SmoothMultipleNegativesRankingLoss"]
