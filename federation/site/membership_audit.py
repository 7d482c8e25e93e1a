"""A site's membership-inference audit of a job's final model (run-config ``membership-audit``): how well an attacker
holding the model tells the site's training studies (members) from its held-out ones (non-members). The attacks are in
``federation/learning/membership.py``; this module gives them per-study losses, and trains LiRA's reference models.

A study's loss is the task's own training objective over the whole study, from the evaluation's sliding-window
prediction in one pass without mirroring (an attacker's cheapest query of the model; mirroring would double the cost of
every pass): the recipe's voxel cross-entropy + soft Dice of the lesion probability map against the reference mask, plus
its classification loss on the study probability where the label is known.

LiRA's reference models (``membership-references`` of them, ``membership-steps`` steps each) are trained at the site,
without DP, on random halves of all its studies (members and non-members alike, in complementary pairs:
``learning.membership.reference_partitions``), so every study is left out of half of them. They start from the same
weights as the target: from the job's starting model when the job fine-tuned a base model (references trained from
random weights would score a fine-tuned model's studies against models of another kind, and the attack would read less
than an attacker who knows the public base; a site without that model, not asked in round 1, runs the loss attack only),
else each from its own seeded random initialisation. The job's final model never enters them. Only the attacks' AUC and
TPR at 1 % FPR leave the site (``AttackResult.as_metrics``): never a loss or a score."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from torch import nn

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.evaluation import predict_samples
from radfed.federation.learning.membership import (
    Attack,
    MembershipAudit,
    evaluate_attack,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    reference_partitions,
)
from radfed.federation.learning.training import TrainingSettings, arrays_to_model, new_model, train_local
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.model.windows import Prediction

logger = logging.getLogger(__name__)
_EPS = 1e-7  # probabilities are clipped away from 0 and 1 before their logarithm


@dataclass(frozen=True)
class AuditSettings:
    """One site's audit: which attack, and for LiRA how many reference models of how many steps."""

    audit: MembershipAudit = MembershipAudit.LOSS
    references: int = 4
    reference_steps: int = 30
    learning_rate: float = 0.0  # > 0: the job's learning-rate override, for the reference models too
    seed: int = 0  # the reference models' splits, initial weights and crops
    # the job's starting model when it fine-tuned a base model: the reference models start from it too
    initial: Sequence[np.ndarray] | None = field(default=None, compare=False, repr=False)


def study_loss(prediction: Prediction, sample: TrainingSample, spec: TaskSpec) -> float:
    """The recipe's objective on one whole study (see the module's docstring)."""
    recipe = spec.training
    probability = np.clip(prediction.probability.astype(np.float64), _EPS, 1 - _EPS)
    reference = (sample.lesions > 0).astype(np.float64)
    if probability.shape != reference.shape:
        raise ValueError(f"prediction {probability.shape} and reference mask {reference.shape} differ")
    loss = 0.0
    if recipe.ce_weight:
        cross_entropy = -(reference * np.log(probability) + (1 - reference) * np.log1p(-probability)).mean()
        loss += recipe.ce_weight * float(cross_entropy)
    if recipe.dice_weight:
        dice = (2 * float((probability * reference).sum()) + 1) / (float(probability.sum() + reference.sum()) + 1)
        loss += recipe.dice_weight * (1 - dice)
    if recipe.classification_weight and sample.label >= 0:
        score = min(max(prediction.study_probability, _EPS), 1 - _EPS)
        loss += recipe.classification_weight * -float(np.log(score if sample.label else 1 - score))
    return loss


def study_losses(
    model: nn.Module, samples: Sequence[TrainingSample], spec: TaskSpec, arbiter: DeviceArbiter | None = None
) -> npt.NDArray[np.float64]:
    """Each study's loss under ``model``; with the node's ``arbiter``, clinical jobs go first (as in training)."""
    plain = replace(spec, inference=replace(spec.inference, mirror=False))
    predictions = predict_samples(model, samples, plain, arbiter)
    return np.array([study_loss(p, s, spec) for s, p in zip(samples, predictions, strict=True)], dtype=np.float64)


def reference_confidences(
    samples: Sequence[TrainingSample], spec: TaskSpec, settings: AuditSettings, arbiter: DeviceArbiter | None = None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Train the reference models on their halves; (their logit-scaled confidence on every study, which studies
    each trained on), both (references, studies)."""
    trained = reference_partitions(len(samples), settings.references, settings.seed)
    recipe = replace(spec.training, learning_rate=settings.learning_rate) if settings.learning_rate else spec.training
    confidence = np.empty(trained.shape, dtype=np.float64)
    for index, half in enumerate(trained):
        if settings.initial is None:
            model = new_model(spec, seed=settings.seed + 1 + index)
        else:
            model = arrays_to_model(spec, list(settings.initial))
        steps = TrainingSettings.from_spec(
            spec, recipe=recipe, seed=settings.seed + index, steps=settings.reference_steps
        )
        train_local(model, [s for s, chosen in zip(samples, half, strict=True) if chosen], spec, steps, arbiter=arbiter)
        confidence[index] = logit_confidence(study_losses(model, samples, spec, arbiter))
    return confidence, trained


def audit_model(
    model: nn.Module,
    members: Sequence[TrainingSample],
    non_members: Sequence[TrainingSample],
    spec: TaskSpec,
    settings: AuditSettings,
    arbiter: DeviceArbiter | None = None,
) -> dict[str, float | int]:
    """The audit's allow-listed metrics (``learning.membership.METRICS``); empty when it is off or a side has no
    study."""
    if settings.audit is MembershipAudit.OFF or not members or not non_members:
        return {}
    started = time.perf_counter()
    studies = [*members, *non_members]
    losses = study_losses(model, studies, spec, arbiter)
    references = None
    if settings.audit is MembershipAudit.LIRA:
        references = reference_confidences(studies, spec, settings, arbiter)
    metrics = attack_metrics(losses, len(members), references)
    metrics["membership_seconds"] = time.perf_counter() - started
    logger.info("membership audit (%s): %d members, %d non-members", settings.audit, len(members), len(non_members))
    return metrics


def attack_metrics(
    losses: npt.NDArray[np.float64],
    members: int,
    references: tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]] | None = None,
) -> dict[str, float | int]:
    """Both attacks' metrics from the target model's per-study losses (the first ``members`` of them the members')
    and, for LiRA, the reference models' confidences and training halves (``reference_confidences``)."""
    scores = loss_scores(losses)
    metrics: dict[str, float | int] = evaluate_attack(scores[:members], scores[members:]).as_metrics(Attack.LOSS)
    if references is not None:
        lira = lira_offline_scores(logit_confidence(losses), *references)
        metrics |= evaluate_attack(lira[:members], lira[members:]).as_metrics(Attack.LIRA)
        metrics["membership_references"] = len(references[0])
    return metrics
