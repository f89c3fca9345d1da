"""Frozen-feature evaluation of a pre-trained backbone: weighted kNN top-1 (lightly's
``knn_predict``) and a linear probe (logistic regression), as the demo reports them.

Example:
    >>> import torch
    >>> from smooth_infonce.integrations.demo.evaluation import knn_top1
    >>> train = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); labels = torch.tensor([0, 1])
    >>> knn_top1(train, labels, torch.tensor([[0.9, 0.1]]), torch.tensor([0]), k=1)
    1.0
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from smooth_infonce.integrations.data.digits import ImageList
from smooth_infonce.integrations.recipes import ViewSpec


def eval_transform(image_size: int, views: ViewSpec):
    """Resize, centre crop and normalise like the training views (no augmentation)."""
    from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T

    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean=views.mean, std=views.std)])


def stack_eval_images(images: ImageList, transform) -> Tensor:
    return torch.stack([transform(images.image(i)) for i in range(len(images))])


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Tensor, device: str, batch_size: int = 512) -> Tensor:
    """Backbone features in eval mode (the training mode is restored), float32 on the CPU."""
    was_training = backbone.training
    backbone.eval()
    features = torch.cat([backbone(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    backbone.train(was_training)
    return features


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
             k: int) -> float:
    """Weighted kNN top-1 (lightly's knn_predict, cosine similarity, temperature 0.1)."""
    from lightly.utils.benchmarking import knn_predict

    bank = nn.functional.normalize(train_features, dim=1).t().contiguous()
    predicted = knn_predict(nn.functional.normalize(test_features, dim=1), bank, train_labels,
                            num_classes=int(train_labels.max()) + 1, knn_k=min(k, bank.shape[1]))
    return float((predicted[:, 0] == test_labels).float().mean())


def linear_probe_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                      test_labels: Tensor) -> float:
    """Logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_features.numpy(), train_labels.numpy())
    return float(probe.score(test_features.numpy(), test_labels.numpy()))


@dataclass
class EvalData:
    """The evaluation images (transformed, stacked) and labels of the memory and test splits."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @classmethod
    def from_images(cls, train: ImageList, test: ImageList, transform) -> "EvalData":
        return cls(stack_eval_images(train, transform), torch.tensor(train.labels),
                   stack_eval_images(test, transform), torch.tensor(test.labels))

    def knn(self, backbone: nn.Module, device: str, k: int) -> float:
        return knn_top1(extract_features(backbone, self.train_images, device), self.train_labels,
                        extract_features(backbone, self.test_images, device), self.test_labels, k)

    def evaluate(self, backbone: nn.Module, device: str, k: int) -> Dict[str, float]:
        train = extract_features(backbone, self.train_images, device)
        test = extract_features(backbone, self.test_images, device)
        return {"knn_top1": knn_top1(train, self.train_labels, test, self.test_labels, k),
                "linear_top1": linear_probe_top1(train, self.train_labels, test, self.test_labels)}

    def raw_pixels(self, k: int) -> Dict[str, float]:
        """The same scores on the flattened pixels (a reference that needs no network)."""
        train, test = self.train_images.flatten(start_dim=1), self.test_images.flatten(start_dim=1)
        return {"knn_top1": knn_top1(train, self.train_labels, test, self.test_labels, k),
                "linear_top1": linear_probe_top1(train, self.train_labels, test, self.test_labels)}


# --- comparing runs ------------------------------------------------------------------------------

def t_critical(samples: int) -> float:
    """Half-width of the two-sided 95 % t interval of a mean, in standard errors (samples - 1
    degrees of freedom): 2.78 at 5 samples, 4.30 at 3; infinite below 2."""
    from scipy.stats import t

    return float(t.ppf(0.975, samples - 1)) if samples > 1 else float("inf")


def paired_difference(treated: Sequence[float], baseline: Sequence[float]) -> Dict[str, float]:
    """Mean of ``treated[i] - baseline[i]`` (pairs: the same seed, so the same batches), its
    standard error, the 95 % t interval's half-width ``ci95`` and ``resolved``: whether that
    interval excludes 0."""
    if len(treated) != len(baseline) or not treated:
        raise ValueError(f"paired_difference needs equally many values, at least one; got {len(treated)} and "
                         f"{len(baseline)}")
    diffs = [a - b for a, b in zip(treated, baseline)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    ci95 = t_critical(len(diffs)) * se
    return dict(mean=mean, se=se, ci95=ci95, pairs=len(diffs), resolved=bool(abs(mean) > ci95))
