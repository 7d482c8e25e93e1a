"""The first wave's network (``model.architecture = "unet3d"``): a compact 3-D U-Net with a classification head
(GroupNorm, not BatchNorm, so that Opacus' DP-SGD can compute per-sample gradients). Built by networks.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _block(in_channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(groups, out_channels), out_channels),
        nn.ReLU(inplace=False),
        nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(groups, out_channels), out_channels),
        nn.ReLU(inplace=False),
    )


class UNet3D(nn.Module):
    """Three levels; the first pooling is in-plane only (prostate MRI has few, thick slices).

    Inputs (N, C, D, H, W) with D divisible by 2 and H, W by 4; outputs the segmentation logits
    (N, 1, D, H, W) and one classification logit per input (N, 1).
    """

    def __init__(self, in_channels: int, features: Sequence[int] = (12, 24, 48), groups: int = 4) -> None:
        super().__init__()
        if len(features) != 3:
            raise ValueError(f"features must name three levels, got {list(features)}")
        f1, f2, f3 = features
        self.enc1 = _block(in_channels, f1, groups)
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.enc2 = _block(f1, f2, groups)
        self.pool2 = nn.MaxPool3d((2, 2, 2))
        self.bottleneck = _block(f2, f3, groups)
        self.up2 = nn.ConvTranspose3d(f3, f2, kernel_size=(2, 2, 2), stride=(2, 2, 2))
        self.dec2 = _block(2 * f2, f2, groups)
        self.up1 = nn.ConvTranspose3d(f2, f1, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.dec1 = _block(2 * f1, f1, groups)
        self.segmentation = nn.Conv3d(f1, 1, kernel_size=1)
        self.classifier = nn.Linear(2 * f3, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.enc1(image)
        e2 = self.enc2(self.pool1(e1))
        b = self.bottleneck(self.pool2(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        pooled = torch.cat([b.mean(dim=(2, 3, 4)), b.amax(dim=(2, 3, 4))], dim=1)
        return self.segmentation(d1), self.classifier(pooled)
