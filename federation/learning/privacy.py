"""Differentially private local training (DP-SGD with Opacus) with a per-site budget for the whole job.

The privacy unit is a study (one patient's examination): each step Poisson-samples studies with rate
q = batch / cohort size and takes one random crop of each. The RDP accountant's history is persisted at the
site after every round and loaded into the next process's engine before ``make_private``, so epsilon adds
up across rounds and restarts (SETUP.md measured 3 x 100 steps = 1 x 300). A site refuses to train when the
planned steps would take it past its budget, and says so.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.networks import TrainableScope, trainable_only
from radfed.federation.learning.training import (
    OptimizerState,
    PatchSampler,
    ProximalTerm,
    TrainingLog,
    TrainingSettings,
    device_turn,
    loss_fn,
    make_optimizer,
)
from radfed.inference.errors import RadfedError
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.recipe import DiceOver
from radfed.inference.model.taskspec import TaskSpec

logger = logging.getLogger(__name__)


class PrivacyBudgetExceededError(RadfedError, RuntimeError):
    """Training now would spend more than the site's (epsilon, delta) budget for this job."""


@dataclass(frozen=True)
class PrivacySettings:
    """A site's budget for the whole job and how noise is calibrated.

    ``noise_multiplier`` is normally derived so that ``planned_steps`` (all rounds of the job) spend exactly
    the budget; a fixed value can be given instead.
    """

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    planned_steps: int | None = None
    noise_multiplier: float | None = None
    trainable: TrainableScope = TrainableScope.ALL  # what DP-SGD updates (the guarantee does not depend on it)

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.delta < 1:
            raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got ({self.epsilon}, {self.delta})")
        if self.noise_multiplier is None and not self.planned_steps:
            raise ValueError("give noise_multiplier or planned_steps (to calibrate the noise to the budget)")


class _StudyCrops(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One augmented patch of study ``i`` per access (the privacy unit is the study); a study with lesions
    gives a lesion-centred patch with the recipe's foreground probability."""

    def __init__(self, samples: Sequence[TrainingSample], spec: TaskSpec, settings: TrainingSettings) -> None:
        self.samples = samples
        self.sampler = PatchSampler(spec, settings.recipe, settings.seed)
        self.fraction = settings.recipe.foreground_fraction

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        force = bool(self.sampler.rng.random() < self.fraction)
        image, mask, target = self.sampler.crop(self.samples[index], force)
        return torch.from_numpy(image), torch.from_numpy(mask)[None], torch.tensor([target], dtype=torch.float32)


def _rdp_accountant(state: dict[str, Any] | None) -> Any:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    if state:
        accountant.history = [tuple(step) for step in state["history"]]
    return accountant


def load_accountant_state(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def save_accountant_state(path: Path, accountant: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"mechanism": "rdp", "history": [list(step) for step in accountant.history]}))
    temporary.replace(path)  # never a half-written budget


def epsilon_spent(state: dict[str, Any] | None, delta: float) -> float:
    accountant = _rdp_accountant(state)
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


def calibrated_noise(privacy: PrivacySettings, sample_rate: float) -> float:
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=privacy.epsilon,
            target_delta=privacy.delta,
            sample_rate=sample_rate,
            steps=privacy.planned_steps,
            accountant="rdp",
        )
    )


def check_budget(
    state: dict[str, Any] | None, privacy: PrivacySettings, noise: float, sample_rate: float, steps: int
) -> float:
    """Epsilon after ``steps`` more steps; raises PrivacyBudgetExceededError past the budget."""
    accountant = _rdp_accountant(state)
    accountant.history.append((noise, sample_rate, steps))
    projected = float(accountant.get_epsilon(privacy.delta))
    if projected > privacy.epsilon * (1 + 1e-6):
        spent = epsilon_spent(state, privacy.delta)
        raise PrivacyBudgetExceededError(
            f"training {steps} more steps would reach epsilon {projected:.2f} (delta {privacy.delta:g}); "
            f"this site's budget is {privacy.epsilon:.2f} and {spent:.2f} is already spent (a job's budget is kept "
            "under its name, across runs of that name): refusing to train"
        )
    return projected


def train_private(
    model: nn.Module,
    samples: Sequence[TrainingSample],
    spec: TaskSpec,
    settings: TrainingSettings,
    privacy: PrivacySettings,
    accountant_path: Path,
    steps: int,
    optimizer_state: OptimizerState | None = None,
    arbiter: DeviceArbiter | None = None,
) -> tuple[TrainingLog, float]:
    """``steps`` DP-SGD steps on ``model`` (modified in place); returns the log and epsilon spent so far.
    The momentum carried between rounds (``optimizer_state``) is computed from noised gradients only, so
    keeping it is post-processing and costs no privacy. Only ``privacy.trainable``'s parameters change."""
    from opacus.validators import ModuleValidator

    if not samples:
        raise ValueError("no training samples")
    model.train()
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ValueError(f"model is not DP-compatible: {problems[0]}")
    # Opacus' Poisson loader samples each study with rate 1 / (expected batches per epoch).
    sample_rate = 1.0 / math.ceil(len(samples) / settings.batch_size)
    noise = calibrated_noise(privacy, sample_rate)
    state = load_accountant_state(accountant_path)
    check_budget(state, privacy, noise, sample_rate, steps)
    torch.manual_seed(settings.seed)
    with trainable_only(model, privacy.trainable):
        log, engine = _private_steps(
            model, samples, spec, settings, noise, privacy.max_grad_norm, state, steps, optimizer_state, arbiter
        )
    save_accountant_state(accountant_path, engine.accountant)
    model.eval()
    spent = float(engine.accountant.get_epsilon(privacy.delta))
    logger.info("DP-SGD: %d steps, noise %.3f, q %.3f, epsilon spent %.3f", log.steps, noise, sample_rate, spent)
    return log, spent


def _private_steps(
    model: nn.Module,
    samples: Sequence[TrainingSample],
    spec: TaskSpec,
    settings: TrainingSettings,
    noise: float,
    max_grad_norm: float,
    state: dict[str, Any] | None,
    steps: int,
    optimizer_state: OptimizerState | None,
    arbiter: DeviceArbiter | None,
) -> tuple[TrainingLog, Any]:
    """The DP-SGD steps on the parameters that take gradients; returns the log and the privacy engine."""
    from opacus import PrivacyEngine

    loader = DataLoader(_StudyCrops(samples, spec, settings), batch_size=settings.batch_size)
    optimizer = make_optimizer(model, settings)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure_mode (no torchcsprng wheel here)
        engine = PrivacyEngine(accountant="rdp")
        engine.accountant = _rdp_accountant(state)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="functorch",
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(private_optimizer, settings.learning_rate_factor)
    proximal = ProximalTerm(model, settings.proximal_mu, settings.recipe.learning_rate)
    # Clipping bounds one study's influence only if each study's gradient depends on that study alone: a Dice
    # over the whole batch would let every study move the others' gradients, so DP takes the per-patch Dice.
    recipe = replace(settings.recipe, dice_over=DiceOver.PATCH)
    log = TrainingLog()
    started = time.perf_counter()
    private_model.train()
    done = 0
    # The first layer's input needs no gradient; torch says so on every step (harmless with Opacus' hooks).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        while done < steps:
            for images, masks, targets in private_loader:
                with device_turn(arbiter) as paused:
                    private_optimizer.zero_grad()
                    if images.shape[0] == 0:
                        # An empty Poisson batch still releases a noisy (all-noise) step, as the analysis assumes.
                        for parameter in (p for p in private_model.parameters() if p.requires_grad):
                            parameter.grad_sample = torch.zeros((0, *parameter.shape))
                        private_optimizer.step()
                        log.losses.append(math.nan)
                    else:
                        loss = loss_fn(private_model, images, masks, targets, recipe)
                        loss.backward()
                        private_optimizer.step()
                        log.losses.append(float(loss.detach()))
                log.paused_seconds += sum(paused)
                scheduler.step()
                proximal.apply(model)
                done += 1
                if done >= steps:
                    break
    log.seconds = time.perf_counter() - started
    log.steps = done
    log.optimizer_state = optimizer.state_dict()
    private_model._close()  # detach Opacus' hooks: the plain model can be trained (or made private) again
    return log, engine


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under Opacus' GradSampleModule (what is sent or exported)."""
    inner = getattr(model, "_module", model)
    assert isinstance(inner, nn.Module)
    return inner
