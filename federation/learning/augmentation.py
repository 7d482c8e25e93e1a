"""Patch augmentation from the recipe, with MONAI's dictionary transforms (nnU-Net's set: rotation and
scaling, elastic deformation, mirroring, gamma, noise, blur, brightness, contrast, simulated low
resolution). A 2-D plan augments each slice in-plane; a 3-D plan rotates about the slice axis only, so
thick slices are never tilted into the plane."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from radfed.inference.model.recipe import Augmentation, TrainingRecipe

# A spatial augmentation samples a region this much larger than the patch, then cuts the patch from the
# centre of the rotated/scaled result, so that its corners hold image rather than padding.
SPATIAL_MARGIN = 1.3
_SPATIAL = {Augmentation.ROTATE, Augmentation.SCALE, Augmentation.ELASTIC}


class PatchAugmenter:
    """Applies the recipe's augmentations to one (image, mask) patch pair.

    ``image`` is (C, D, H, W), ``mask`` (D, H, W); with ``spatial_dims == 2`` D is 1 and every transform
    works in-plane. Randomness comes from ``seed`` alone (MONAI's generators are seeded from it).
    """

    def __init__(self, recipe: TrainingRecipe, patch: Sequence[int], spatial_dims: int, seed: int) -> None:
        self.recipe = recipe
        self.patch = tuple(int(p) for p in patch)
        self.dims = spatial_dims
        self.enabled = set(recipe.augmentations)
        self.spatial = bool(self.enabled & _SPATIAL)
        self.transform = self._compose() if self.enabled else None
        if self.transform is not None:
            self.transform.set_random_state(seed=seed % (2**32))

    def sample_shape(self) -> tuple[int, int, int]:
        """The region to crop before augmentation (larger than the patch in-plane when it is rotated)."""
        if not self.spatial:
            return (self.patch[0], self.patch[1], self.patch[2])
        margin = [1.0, SPATIAL_MARGIN, SPATIAL_MARGIN]
        return (self.patch[0], *(math.ceil(p * m) for p, m in zip(self.patch[1:], margin[1:], strict=True)))  # type: ignore[return-value]

    def _compose(self) -> Any:
        import monai.transforms as mt

        r, p, keys = self.recipe, self.recipe.augmentation_probability, ["image", "label"]
        on = self.enabled
        spatial_size = list(self.patch[1:]) if self.dims == 2 else list(self.patch)
        angle = math.radians(r.rotation_deg) if Augmentation.ROTATE in on else 0.0
        low, high = r.scale_range
        scale = (low - 1.0, high - 1.0) if Augmentation.SCALE in on else (0.0, 0.0)
        rotate: Any
        scales: Any
        if self.dims == 2:
            rotate = angle
            scales = (scale, scale)
        else:
            rotate = (angle, 0.0, 0.0)  # about the slice axis: in-plane only
            scales = ((0.0, 0.0), scale, scale)
        steps: list[Any] = [
            mt.RandAffined(
                keys,
                prob=p if (angle or scale != (0.0, 0.0)) else 0.0,
                rotate_range=rotate,
                scale_range=scales,
                spatial_size=spatial_size,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        ]
        if Augmentation.ELASTIC in on:
            modes = ("bilinear", "nearest")
            if self.dims == 2:
                steps.append(mt.Rand2DElasticd(keys, spacing=(16, 16), magnitude_range=(0, 1), prob=p / 2, mode=modes))
            else:
                steps.append(
                    mt.Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(0, 50), prob=p / 2, mode=modes)
                )
        for axis in r.flip_axes if Augmentation.FLIP in on else ():
            if self.dims == 3 or axis > 0:
                steps.append(mt.RandFlipd(keys, prob=0.5, spatial_axis=axis if self.dims == 3 else axis - 1))
        if Augmentation.NOISE in on:
            steps.append(mt.RandGaussianNoised("image", prob=p / 2, std=0.1))
        if Augmentation.BLUR in on:
            sigma = (0.5, 1.0)
            steps.append(mt.RandGaussianSmoothd("image", prob=p, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma))
        if Augmentation.BRIGHTNESS in on:
            steps.append(mt.RandScaleIntensityd("image", factors=0.25, prob=p))
        if Augmentation.CONTRAST in on:
            steps.append(mt.RandScaleIntensityFixedMeand("image", factors=0.25, prob=p, preserve_range=True))
        if Augmentation.LOWRES in on:
            upsample = "bilinear" if self.dims == 2 else "trilinear"
            steps.append(mt.RandSimulateLowResolutiond("image", prob=p, zoom_range=(0.5, 1.0), upsample_mode=upsample))
        if Augmentation.GAMMA in on:
            steps.append(mt.RandAdjustContrastd("image", prob=p, gamma=(0.7, 1.5), retain_stats=True))
        return mt.Compose(steps)

    def __call__(
        self, image: npt.NDArray[np.float32], mask: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        if self.transform is None:
            return image, mask
        if self.dims == 2:
            data = {"image": image[:, 0], "label": mask[None, 0]}
        else:
            data = {"image": image, "label": mask[None]}
        out = self.transform(data)
        new_image = np.asarray(out["image"], dtype=np.float32)
        new_mask = (np.asarray(out["label"], dtype=np.float32) > 0.5).astype(np.float32)
        if self.dims == 2:
            return new_image[:, None], new_mask
        return new_image, new_mask[0]
