"""The reconstruction check's parts (federation/lab/reconstruction.py): the DP release as Opacus applies it to a
batch of one, the analytic attack on a dense first layer (exact without noise, nothing with DP's noise), the
optimisation attack (it recovers a study where the update holds it), and the similarity scores."""

from __future__ import annotations

import math

import numpy as np
import torch

from radfed.federation.lab.reconstruction import (
    DenseSegmenter,
    DpRelease,
    dense_inversion,
    gradient_inversion,
    segmentation_loss,
    similarity,
    site_update,
)

SIZE = 12


def _study() -> tuple[torch.Tensor, torch.Tensor]:
    """A structured 2-channel slice with a bright lesion, and its mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    lesion = (((yy - 5) ** 2 + (xx - 7) ** 2) < 6).astype(np.float32)
    first = np.sin(yy / 2.0) + np.cos(xx / 3.0) + 2 * lesion
    image = np.stack([first, first[::-1] * 0.5 + lesion]).astype(np.float32)
    image = (image - image.mean()) / image.std()
    return torch.from_numpy(image)[None], torch.from_numpy(lesion)[None, None]


def _network() -> DenseSegmenter:
    torch.manual_seed(0)
    return DenseSegmenter(2, SIZE, SIZE, hidden=64)


def test_similarity_scores_identity_affine_copies_and_a_flat_image() -> None:
    image, _ = _study()
    assert similarity(image, image).ssim > 0.9999 and similarity(image, image).psnr > 100
    shifted = similarity(3 * image - 2, image)  # a channel's scale and offset are forgiven (instance norm hides them)
    assert shifted.ssim > 0.999 and shifted.psnr > 60
    flat = similarity(1e-3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0)), image)
    assert flat.ssim < 0.2 and flat.psnr < 20


def test_the_dp_release_clips_then_adds_noise_of_the_multiplier_times_the_clip() -> None:
    image, mask = _study()
    net = _network()
    clean = site_update(net, segmentation_loss, image, mask, None)
    norm = math.sqrt(sum(float((g**2).sum()) for g in clean))
    assert norm > 0.05
    clipped = site_update(net, segmentation_loss, image, mask, DpRelease(0.0, clip_norm=norm / 10))
    assert math.isclose(math.sqrt(sum(float((g**2).sum()) for g in clipped)), norm / 10, rel_tol=1e-4)
    noisy = site_update(net, segmentation_loss, image, mask, DpRelease(2.0, clip_norm=0.5), seed=1)
    residual = torch.cat([(n - c * min(1.0, 0.5 / norm)).flatten() for n, c in zip(noisy, clean, strict=True)])
    assert math.isclose(float(residual.std()), 2.0 * 0.5, rel_tol=0.02)  # ~30 k coordinates


def test_a_dense_first_layer_gives_the_study_away_unless_dp_adds_noise() -> None:
    image, mask = _study()
    net = _network()
    for dp in (None, DpRelease(0.0)):  # clipping alone scales both gradients: the ratio survives
        grads = site_update(net, segmentation_loss, image, mask, dp)
        assert similarity(dense_inversion(grads[0], grads[1]).reshape(image.shape), image).ssim > 0.999
    grads = site_update(net, segmentation_loss, image, mask, DpRelease(1.0))
    assert similarity(dense_inversion(grads[0], grads[1]).reshape(image.shape), image).ssim < 0.3


def test_gradient_inversion_recovers_a_study_the_update_holds() -> None:
    image, mask = _study()
    net = _network()
    observed = site_update(net, segmentation_loss, image, mask, None)
    recovered, distance = gradient_inversion(net, segmentation_loss, observed, mask, image.shape, iterations=80)
    assert recovered.shape == image.shape and distance < 0.2
    assert similarity(recovered, image).ssim > 0.5  # a random start scores ~0
