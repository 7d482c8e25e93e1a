"""The reconstruction check: what a curious coordinator recovers of one study from one site's single-step update,
with and without DP-SGD's clipping and noise. The attacker's best case throughout: a batch of one study, the update
seen before any averaging, the global model and the study's lesion mask known.

Two attacks:
- ``dense_inversion``: exact for a network whose first layer is dense with a bias. For one study, that layer's
  weight gradient is row i = delta_i * x and its bias gradient is delta_i, so the input is their least-squares ratio
  over the layer's units (Phong et al., IEEE TIFS 2018). It is the harness's positive control.
- ``gradient_inversion``: the optimisation attack of Geiping et al. (NeurIPS 2020, "Inverting Gradients"): an
  image whose gradient has the smallest cosine distance to the observed update, plus a total-variation prior,
  Adam on signed gradients with step decay at 3/8, 5/8 and 7/8 of the iterations. Works on any network.

``similarity`` scores what was recovered: SSIM (7 x 7 uniform window, the truth's range) and PSNR, each after the
best affine map per channel, since a normalised network cannot see a channel's scale and offset."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the PyTorch idiom

# loss(model, image, mask) -> scalar: the training loss the site computed its update with
Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DpRelease:
    """DP-SGD as Opacus applies it to a batch of one: the gradient clipped to ``clip_norm`` (L2 over all
    parameters), then Gaussian noise of std ``noise_multiplier * clip_norm`` on every coordinate."""

    noise_multiplier: float
    clip_norm: float = 1.0


@dataclass(frozen=True)
class Similarity:
    ssim: float
    psnr: float


def site_update(
    model: nn.Module, loss: Loss, image: torch.Tensor, mask: torch.Tensor, dp: DpRelease | None, seed: int = 0
) -> list[torch.Tensor]:
    """The gradient one study gives (what a single SGD step sends, up to the learning rate), as released."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [g.detach() for g in torch.autograd.grad(loss(model, image, mask), params)]
    if dp is None:
        return grads
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    scale = min(1.0, dp.clip_norm / max(norm, 1e-12))
    generator = torch.Generator().manual_seed(seed)
    std = dp.noise_multiplier * dp.clip_norm
    return [g * scale + std * torch.randn(g.shape, generator=generator) for g in grads]


def dense_inversion(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The input of a dense first layer (units x inputs) from its weight and bias gradients for one study."""
    return (bias_grad[:, None] * weight_grad).sum(0) / (bias_grad**2).sum().clamp_min(1e-30)


def gradient_inversion(
    model: nn.Module,
    loss: Loss,
    observed: Sequence[torch.Tensor],
    mask: torch.Tensor,
    shape: Sequence[int],
    iterations: int = 2000,
    tv_weight: float = 1e-3,
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """(the recovered image, its gradient's cosine distance to ``observed``): the iterate of least distance."""
    params = [p for p in model.parameters() if p.requires_grad]
    target_norm = torch.sqrt(torch.stack([(o**2).sum() for o in observed]).sum())
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(tuple(shape), generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([image], lr=0.1)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)
    best, best_distance = image.detach().clone(), math.inf
    for _ in range(iterations):
        optimiser.zero_grad()
        grads = torch.autograd.grad(loss(model, image, mask), params, create_graph=True)
        dot = torch.stack([(g * o).sum() for g, o in zip(grads, observed, strict=True)]).sum()
        norm = torch.sqrt(torch.stack([(g**2).sum() for g in grads]).sum())
        distance = 1 - dot / (norm * target_norm).clamp_min(1e-30)
        if float(distance.detach()) < best_distance:
            best, best_distance = image.detach().clone(), float(distance.detach())
        (distance + tv_weight * total_variation(image)).backward()
        assert image.grad is not None
        image.grad.sign_()
        optimiser.step()
        schedule.step()
    return best, best_distance


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbours along the last two (in-plane) axes."""
    return (image[..., 1:, :] - image[..., :-1, :]).abs().mean() + (image[..., :, 1:] - image[..., :, :-1]).abs().mean()


def similarity(recovered: torch.Tensor, truth: torch.Tensor, window: int = 7) -> Similarity:
    """SSIM and PSNR of ``recovered`` against ``truth`` ((1, C, ..., H, W)), each channel first mapped by its
    least-squares affine fit to the truth."""
    truth = truth.detach().reshape(truth.shape[1], 1, *truth.shape[-2:]).double()
    recovered = recovered.detach().reshape(truth.shape).double()
    fitted = torch.empty_like(recovered)
    for c in range(truth.shape[0]):
        a, b = recovered[c].flatten(), truth[c].flatten()
        design = torch.stack([a, torch.ones_like(a)], 1)
        solution = torch.linalg.lstsq(design, b[:, None]).solution
        fitted[c] = (design @ solution).reshape(fitted[c].shape)
    data_range = float(truth.max() - truth.min())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    kernel = torch.ones(1, 1, window, window, dtype=torch.float64) / window**2
    mu_a, mu_b = F.conv2d(fitted, kernel), F.conv2d(truth, kernel)
    var_a = F.conv2d(fitted * fitted, kernel) - mu_a**2
    var_b = F.conv2d(truth * truth, kernel) - mu_b**2
    cov = F.conv2d(fitted * truth, kernel) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    mse = float(((fitted - truth) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
    return Similarity(float(ssim.mean()), psnr)


class DenseSegmenter(nn.Module):
    """The positive control: a segmentation network whose first layer is dense (input -> hidden, with bias),
    then a dense layer to one logit per pixel. Its update leaks the study exactly, by construction."""

    def __init__(self, channels: int, height: int, width: int, hidden: int = 256) -> None:
        super().__init__()
        self.first = nn.Linear(channels * height * width, hidden)
        self.out = nn.Linear(hidden, height * width)
        self.shape = (height, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.out(F.relu(self.first(image.flatten(1))))
        return logits.reshape(image.shape[0], 1, *self.shape)


def segmentation_loss(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (the recipe's default loss) for a network returning logits."""
    logits = model(image)
    probabilities = torch.sigmoid(logits)
    dice = 1 - (2 * (probabilities * mask).sum() + 1) / (probabilities.sum() + mask.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, mask) + dice
