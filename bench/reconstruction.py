"""The reconstruction check (issue 20): what a coordinator recovers of one study from a site's single-step update,
without DP and with DP-SGD at epsilon 8, on radfed's planned 2-D DynUNet (at init and after some training) and
on a positive control whose dense first layer leaks the study exactly. The study is a real brain slice (the
shared Brain-Tumor-Progression set: patient 03, the slice with the most tumour, 4x downsampled, a 32 x 32 window
on the tumour, z-scored, in each of the task's three channels); synthetic when the shared data is absent.

    RADFED_BENCH_FEDERATION=reconstruction python -m bench federation   # RADFED_BENCH_QUICK=1: 200 iterations
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the PyTorch idiom

from bench.report import table
from radfed.federation.lab.reconstruction import (
    DenseSegmenter,
    DpRelease,
    dense_inversion,
    gradient_inversion,
    segmentation_loss,
    similarity,
    site_update,
)
from radfed.federation.learning.privacy import PrivacySettings, calibrated_noise
from radfed.federation.learning.training import loss_fn, new_model
from tests.small_model import small_spec

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ROOT.parent / "shared" / "data" / "brain_tumor_progression"
SIZE = 32
ITERATIONS = int(os.environ.get("RADFED_BENCH_RECONSTRUCTION_ITERATIONS", "2000"))
PRETRAIN_STEPS = 300  # "after some training": the global model a few rounds in, trained on other patients
# DP as the privacy curve runs it: epsilon 8, delta 1e-5, 8 rounds x 30 steps, 8 of 64 studies per step
EPSILON, DELTA, PLANNED_STEPS, SAMPLE_RATE = 8.0, 1e-5, 240, 8 / 64


def _slices(patient: str, kind: str = "Pre") -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) windows of SIZE x SIZE on the tumour, one per slice with tumour, 4x downsampled, z-scored."""
    import nibabel as nib

    scan: Any = nib.load(BRAIN / patient / f"{kind}_Scan_T1.nii.gz")  # a Nifti1Image; nibabel types a FileBasedImage
    segmentation: Any = nib.load(BRAIN / patient / f"{kind}_Mask.nii.gz")
    image = scan.get_fdata().astype(np.float32)
    mask = segmentation.get_fdata() > 0
    windows = []
    for z in np.argsort(-mask.sum(axis=(0, 1))):
        if mask[:, :, z].sum() < 20:
            break
        small = F.avg_pool2d(torch.from_numpy(image[:, :, z])[None, None], 4)[0, 0].numpy()
        lesion = F.max_pool2d(torch.from_numpy(mask[:, :, z].astype(np.float32))[None, None], 4)[0, 0].numpy()
        centre = np.argwhere(lesion > 0).mean(0).astype(int)
        y, x = (int(np.clip(c, SIZE // 2, s - SIZE // 2)) for c, s in zip(centre, small.shape, strict=True))
        window = small[y - SIZE // 2 : y + SIZE // 2, x - SIZE // 2 : x + SIZE // 2]
        lesion = lesion[y - SIZE // 2 : y + SIZE // 2, x - SIZE // 2 : x + SIZE // 2]
        windows.append(((window - window.mean()) / (window.std() + 1e-6), lesion))
    return windows


def _study() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(image (1, 3, 1, H, W), mask (1, 1, 1, H, W), where it came from)."""
    if BRAIN.is_dir():
        window, lesion = _slices("03")[0]
        source = "real brain slice (patient 03)"
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:SIZE, :SIZE]
        lesion = (((yy - 15) ** 2 + (xx - 17) ** 2) < 25).astype(np.float32)
        window = np.sin(yy / 3.0) + np.cos(xx / 5.0) + 2 * lesion + 0.2 * rng.standard_normal((SIZE, SIZE))
        window = ((window - window.mean()) / window.std()).astype(np.float32)
        source = "synthetic slice (shared data absent)"
    image = torch.from_numpy(np.stack([window] * 3)).float()[None, :, None]
    return image, torch.from_numpy(lesion).float()[None, None, None], source


def _dynunet(trained: bool) -> tuple[nn.Module, object]:
    spec = small_spec()
    recipe = replace(spec.training, augmentations=())
    model = new_model(spec, seed=0)
    if trained and BRAIN.is_dir():
        windows = [
            w for p in ("01", "02", "04", "05", "06", "07", "08") for k in ("Pre", "Post") for w in _slices(p, k)
        ]
        optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
        rng = np.random.default_rng(0)
        for _ in range(PRETRAIN_STEPS):
            pick = rng.integers(len(windows), size=4)
            images = torch.from_numpy(np.stack([np.stack([windows[i][0]] * 3)[:, None] for i in pick])).float()
            masks = torch.from_numpy(np.stack([windows[i][1] for i in pick])).float()[:, None, None]
            loss = loss_fn(model, images, masks, torch.ones(4, 1), recipe)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.train()
    return model, recipe


def reconstruction(quick: bool) -> None:
    torch.set_num_threads(1)
    iterations = 200 if quick else ITERATIONS
    image, mask, source = _study()
    noise = calibrated_noise(PrivacySettings(EPSILON, DELTA, planned_steps=PLANNED_STEPS), SAMPLE_RATE)
    settings = {"none": None, f"epsilon {EPSILON:g} (noise {noise:.2f}, clip 1)": DpRelease(noise)}
    speck = 1e-3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(2))  # a constant has no fit
    flat = similarity(torch.zeros_like(image) + speck, image)
    rows: list[list[object]] = [["(a flat image: the floor)", "-", "-", f"{flat.ssim:.3f}", f"{flat.psnr:.2f}", "-"]]

    dense = DenseSegmenter(3, SIZE, SIZE)
    flat_image, flat_mask = image[:, :, 0], mask[:, :, 0]
    # clipping alone scales the update and leaves the ratio the analytic attack reads: the noise is what protects
    for dp_name, dp in {**settings, "clipping to 1 only (noise 0)": DpRelease(0.0)}.items():
        grads = site_update(dense, segmentation_loss, flat_image, flat_mask, dp)
        found = similarity(dense_inversion(grads[0], grads[1]).reshape(flat_image.shape), flat_image)
        rows.append(["dense first layer (control)", dp_name, "analytic", f"{found.ssim:.3f}", f"{found.psnr:.2f}", "-"])
    for dp_name, dp in settings.items():  # the optimisation attack's own control: where the update holds the study
        grads = site_update(dense, segmentation_loss, flat_image, flat_mask, dp)
        shape = flat_image.shape
        recovered, distance = gradient_inversion(dense, segmentation_loss, grads, flat_mask, shape, iterations)
        found = similarity(recovered, flat_image)
        scores = [f"{found.ssim:.3f}", f"{found.psnr:.2f}", f"{distance:.3f}"]
        rows.append(["dense first layer (control)", dp_name, "gradient inversion", *scores])
        print(f"  dense first layer, DP {dp_name}: SSIM {found.ssim:.3f}", flush=True)

    diagnostics = []
    for trained in (False, True):
        model, recipe = _dynunet(trained)
        name = f"radfed 2-D DynUNet, {'after ' + str(PRETRAIN_STEPS) + ' steps' if trained else 'at init'}"

        def loss(net: nn.Module, x: torch.Tensor, m: torch.Tensor, recipe: object = recipe) -> torch.Tensor:
            return loss_fn(net, x, m, torch.ones(1, 1), recipe)  # type: ignore[arg-type]

        clean = site_update(model, loss, image, mask, None)
        noisy = site_update(
            model, loss, image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(2)), mask, None
        )
        diagnostics.append((name, _cosine_distance(clean, noisy)))
        for dp_name, dp in settings.items():
            observed = site_update(model, loss, image, mask, dp)
            recovered, distance = gradient_inversion(model, loss, observed, mask, image.shape, iterations)
            found = similarity(recovered, image)
            rows.append(
                [name, dp_name, "gradient inversion", f"{found.ssim:.3f}", f"{found.psnr:.2f}", f"{distance:.3f}"]
            )
            print(f"  {name}, DP {dp_name}: SSIM {found.ssim:.3f}", flush=True)

    table(
        f"reconstruction from one site's single-step update ({source}, 3 x {SIZE} x {SIZE}, batch of one, the "
        f"lesion mask known; gradient inversion: {iterations} iterations)",
        ["network", "DP", "attack", "SSIM", "PSNR dB", "cosine distance reached"],
        rows,
        "RADFED_BENCH_FEDERATION=reconstruction python -m bench federation",
    )
    for name, distance in diagnostics:
        print(f"{name}: the true study plus noise of 0.1 std gives a gradient at cosine distance {distance:.3f}")


def _cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    dot = sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))
    norms = (sum(float((x**2).sum()) for x in a) * sum(float((y**2).sum()) for y in b)) ** 0.5
    return 1 - dot / norms
