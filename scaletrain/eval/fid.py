"""Feature extractors for FID, and the FID metric built on them.

FID is only as meaningful as its features. InceptionV3 needs torch-fidelity and a
weights file, which offline machines (this project's CPU reference machine included)
do not have, so there are two kinds, and every number carries its kind in its name:

- ``inception`` → ``fid_inception-v3``: torch-fidelity's FID InceptionV3 (through
  torchmetrics' ``NoTrainInceptionV3``) loaded from a local weights file. Comparable
  with published FIDs only when the reference set and image count match too.
- ``offline`` → ``fid_offline-gridorient``: a deterministic extractor defined here. It
  sees what the synthetic shards vary (``data.synth``): colour and position through a
  4 x 4 grid of mean RGB, shape through a histogram of edge orientations. Good for
  tracking one run's progress and for tests; not comparable with any published FID.

``FrechetInceptionDistance`` (torchmetrics) does the statistics and syncs them across
ranks in ``compute()``; ``reset_real_features=False`` keeps the reference statistics
between validations, so real images are read and featurised once per run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

FeatureKind = Literal["offline", "inception"]


class GridOrientFeatures(nn.Module):
    """Offline FID features for images in [-1, 1]: (N, 3, H, W) float → (N, 56) float32.

    - colour and position: mean RGB on a 4 x 4 grid (48 values);
    - shape: a soft histogram of edge orientations (8 bins over 180°, Sobel gradients of the
      grey image, weighted by gradient magnitude, normalised by the total), times 16. Circles
      spread evenly over the bins, squares peak at 0° and 90°, triangles add ±63°.

    Images are first resized to ``size`` (bilinear, antialiased), so features from different
    resolutions share one space. Hand-written because no offline pretrained extractor exists
    here; it has no weights and no randomness. The weight 16 was chosen on synthetic sets so
    that, at 48 images per set, FID(circles, squares), FID(red, blue) and FID(left, right)
    are each > 10x FID(circles, circles') (see tests/unit/test_fid.py); a random conv net in
    its place separated circles from squares only ~2x.
    """

    label = "fid_offline-gridorient"

    def __init__(self, size: int = 32, grid: int = 4, bins: int = 8, orient_weight: float = 16.0) -> None:
        super().__init__()
        self.size, self.grid, self.orient_weight = size, grid, orient_weight
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
        self.register_buffer("sobel", torch.stack([sobel, sobel.t()]).unsqueeze(1))  # (2, 1, 3, 3): d/dx, d/dy
        self.register_buffer("theta", torch.arange(bins) * math.pi / bins)
        self.num_features = 3 * grid * grid + bins  # read by torchmetrics instead of a probe forward

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        colour = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        grad = F.conv2d(x.mean(1, keepdim=True), self.sobel, padding=1)
        gx, gy = grad[:, :1], grad[:, 1:]
        magnitude = (gx.square() + gy.square()).sqrt()
        angle = torch.atan2(gy, gx)
        # cos(2·Δ) has period 180°: an edge and its reverse (dark→light, light→dark) agree.
        votes = torch.cos(2 * (angle - self.theta.view(1, -1, 1, 1))).clamp(min=0).pow(4) * magnitude
        hist = votes.mean((2, 3)) / (magnitude.mean((2, 3)) + 1e-3)
        return torch.cat([colour, self.orient_weight * hist], dim=1)


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3 (2048-d pool features) from a local weights file.

    Takes images in [-1, 1] like the offline extractor; InceptionV3 wants uint8 [0, 255]
    and resizes to 299 itself.
    """

    label = "fid_inception-v3"

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            import torch_fidelity  # noqa: F401 - NoTrainInceptionV3 needs it
        except ImportError:
            raise ImportError(
                "validate.feature_extractor='inception' needs torch-fidelity (pip install 'scaletrain[gpu-eval]'); "
                "or use validate.feature_extractor=offline"
            ) from None
        if not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"validate.inception_weights={str(weights_path)!r} does not exist; point it at "
                "torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
            )
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(pixels).float()


def build_feature_extractor(kind: FeatureKind, inception_weights: str | None = None) -> nn.Module:
    """The extractor for ``validate.feature_extractor``; its ``label`` names the metric."""
    if kind == "offline":
        return GridOrientFeatures()
    if kind == "inception":
        if not inception_weights:
            raise ValueError("validate.feature_extractor='inception' needs validate.inception_weights=PATH "
                             "(a local weights file; nothing is downloaded)")
        return InceptionFeatures(inception_weights)
    raise ValueError(f"validate.feature_extractor={kind!r} is unknown; use 'offline' or 'inception'")


def build_fid(extractor: nn.Module, device: torch.device | str = "cpu") -> FrechetInceptionDistance:
    """FID over ``extractor``'s features that keeps its reference statistics across ``reset()``.

    Inputs to ``update`` are float images in [-1, 1]; ``compute()`` is a collective
    (torchmetrics all-gathers the sums over the default process group): call it on every rank.
    """
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True)
    return fid.to(device)
