"""Evaluation of a model on held-out studies, as counts that add up across sites.

Each site evaluates the global model on its own held-out studies and sends only the counts below (no
per-study value): the coordinator sums them for the pooled figures. Lesions are found with the same
postprocessing as the clinical pipeline (threshold, 26-connected components, minimum volume) on the
model grid, and the study score is the same classification probability the node writes into the SR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.messages import SCORE_BINS
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.model.windows import Prediction, predict_study
from radfed.inference.pipeline.lesions import kept_components, slice_extents

# Study scores are pooled as histograms (no per-study value leaves a site). Bins are even in logit space:
# a trained head puts most studies above 0.99 or below 0.01, where even probability bins would tie them all.
# A trained head put held-out studies of both classes above 0.997 (logit 6) on the synthetic task, ranked
# only further up: bins span logits -24..24, 0.75 wide (beyond goes to the end bins).
SCORE_LOGIT_RANGE = 24.0
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


WITHHELD = "evaluation_withheld"  # the one metric a site sends in place of its figures


def evaluation_withheld(studies: int, min_studies: int) -> bool:
    """``evaluation-min-studies``: a site holding out some studies, but fewer than ``min_studies``, sends no
    figures of them (their sums would be those patients' own)."""
    return 0 < studies < min_studies


@dataclass
class EvaluationCounts:
    studies: int = 0
    dice_sum: float = 0.0  # per-study Dice, summed over studies with a reference lesion
    dice_studies: int = 0
    lesions_total: int = 0
    lesions_found: int = 0
    true_positive: int = 0  # study level, at the task's probability threshold
    false_positive: int = 0
    true_negative: int = 0
    false_negative: int = 0
    positive_scores: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    negative_scores: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    false_positive_components: int = 0  # found lesions that touch no reference lesion
    predicted_voxels: int = 0  # over studies with a reference lesion
    reference_voxels: int = 0

    def __add__(self, other: EvaluationCounts) -> EvaluationCounts:
        return EvaluationCounts(
            self.studies + other.studies,
            self.dice_sum + other.dice_sum,
            self.dice_studies + other.dice_studies,
            self.lesions_total + other.lesions_total,
            self.lesions_found + other.lesions_found,
            self.true_positive + other.true_positive,
            self.false_positive + other.false_positive,
            self.true_negative + other.true_negative,
            self.false_negative + other.false_negative,
            [a + b for a, b in zip(self.positive_scores, other.positive_scores, strict=True)],
            [a + b for a, b in zip(self.negative_scores, other.negative_scores, strict=True)],
            self.false_positive_components + other.false_positive_components,
            self.predicted_voxels + other.predicted_voxels,
            self.reference_voxels + other.reference_voxels,
        )

    def as_metrics(self) -> dict[str, float | int | list[int]]:
        """The counts under the allow-listed ``eval_*`` names (see radfed.federation.learning.messages)."""
        return {
            "eval_studies": self.studies,
            "eval_dice_sum": self.dice_sum,
            "eval_dice_studies": self.dice_studies,
            "eval_lesions_total": self.lesions_total,
            "eval_lesions_found": self.lesions_found,
            "eval_tp": self.true_positive,
            "eval_fp": self.false_positive,
            "eval_tn": self.true_negative,
            "eval_fn": self.false_negative,
            "eval_scores_positive": list(self.positive_scores),
            "eval_scores_negative": list(self.negative_scores),
            "eval_fp_components": self.false_positive_components,
            "eval_predicted_voxels": self.predicted_voxels,
            "eval_reference_voxels": self.reference_voxels,
        }

    def shareable(self, min_studies: int) -> dict[str, float | int | list[int]]:
        """What a site may send (``evaluation-min-studies``): the counts, or only ``evaluation_withheld`` when
        it held out some studies but fewer than ``min_studies`` (their sums would be those patients' own
        figures). With no held-out study the zero counts say only that."""
        if evaluation_withheld(self.studies, min_studies):
            return {WITHHELD: 1}
        return self.as_metrics()

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> EvaluationCounts | None:
        if "eval_studies" not in metrics:
            return None

        def count(name: str) -> int:
            return int(float(metrics[name]))  # type: ignore[arg-type]

        def histogram(name: str) -> list[int]:
            values = metrics[name]
            assert isinstance(values, list | tuple)
            return [int(v) for v in values]

        return cls(
            count("eval_studies"),
            float(metrics["eval_dice_sum"]),  # type: ignore[arg-type]
            count("eval_dice_studies"),
            count("eval_lesions_total"),
            count("eval_lesions_found"),
            count("eval_tp"),
            count("eval_fp"),
            count("eval_tn"),
            count("eval_fn"),
            histogram("eval_scores_positive"),
            histogram("eval_scores_negative"),
            int(float(metrics.get("eval_fp_components", 0))),  # type: ignore[arg-type]
            int(float(metrics.get("eval_predicted_voxels", 0))),  # type: ignore[arg-type]
            int(float(metrics.get("eval_reference_voxels", 0))),  # type: ignore[arg-type]
        )

    def summary(self) -> dict[str, float | int | None]:
        """Dice, lesion-level sensitivity, AUC, sensitivity, specificity, F1 (None where undefined)."""
        tp, fp, tn, fn = self.true_positive, self.false_positive, self.true_negative, self.false_negative
        return {
            "studies": self.studies,
            "dice": self.dice_sum / self.dice_studies if self.dice_studies else None,
            "lesion_sensitivity": self.lesions_found / self.lesions_total if self.lesions_total else None,
            "auc": histogram_auc(self.positive_scores, self.negative_scores),
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "fp_components_per_study": self.false_positive_components / self.studies if self.studies else None,
            "volume_ratio": self.predicted_voxels / self.reference_voxels if self.reference_voxels else None,
        }


def histogram_auc(positive: Sequence[int], negative: Sequence[int]) -> float | None:
    """Area under the ROC curve from binned scores (ties within a bin count one half)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def roc_points(positive: Sequence[int], negative: Sequence[int]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) at every bin edge, for plotting."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    tpr = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / max(pos.sum(), 1.0)
    fpr = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]]) / max(neg.sum(), 1.0)
    return fpr.tolist(), tpr.tolist()


def score_bin(score: float) -> int:
    p = min(max(score, 1e-15), 1.0 - 1e-15)
    logit = math.log(p / (1.0 - p))
    position = (logit + SCORE_LOGIT_RANGE) / (2 * SCORE_LOGIT_RANGE)
    return min(SCORE_BINS - 1, max(0, int(position * SCORE_BINS)))


def lesion_components(
    probability: npt.NDArray[np.float32],
    threshold: float,
    min_volume_mm3: float,
    voxel_mm3: float,
    min_fraction: float = 0.0,
    min_slices: int = 1,
) -> npt.NDArray[np.int32]:
    """Labelled lesion components at the threshold, those under the minimum volume, the minimum share of
    the largest or the minimum slice extent removed (the clinical pipeline's postprocessing, on the model grid)."""
    found, count = ndimage.label(probability >= threshold, structure=_CONNECTIVITY)
    if count:
        sizes = np.bincount(found.ravel(), minlength=count + 1)[1:]
        extents = slice_extents(found, count)
        kept = kept_components(sizes, voxel_mm3, min_volume_mm3, min_fraction, extents=extents, min_slices=min_slices)
        found[np.isin(found, np.flatnonzero(~kept) + 1)] = 0
    return np.asarray(found, dtype=np.int32)


def reference_lesions(
    reference: npt.NDArray[np.bool_], min_volume_mm3: float, voxel_mm3: float
) -> npt.NDArray[np.int32]:
    """The reference mask's lesions: components of at least the task's minimum lesion volume. Smaller
    specks of a drawn mask (a brain set's masks have 1-64 of 1-30 voxels beside each tumour) are below
    what the task reports; they count in Dice, not as lesions to find."""
    return lesion_components(reference.astype(np.float32), 0.5, min_volume_mm3, voxel_mm3)


def study_counts(
    probability: npt.NDArray[np.float32],
    study_score: float,
    sample: TrainingSample,
    spec: TaskSpec,
) -> EvaluationCounts:
    """One held-out study's contribution, from the model's lesion probability map on the model grid."""
    outputs = spec.outputs
    found = lesion_components(
        probability,
        outputs.lesion_threshold,
        outputs.min_lesion_volume_mm3,
        sample.voxel_mm3,
        outputs.lesion_fraction,
        outputs.lesion_slices,
    )
    predicted = found > 0
    reference = sample.lesions > 0
    counts = EvaluationCounts(studies=1)
    touched = set(np.unique(found[reference]).tolist()) - {0}
    counts.false_positive_components = len(set(np.unique(found).tolist()) - {0} - touched)
    if reference.any():
        counts.predicted_voxels = int(predicted.sum())
        counts.reference_voxels = int(reference.sum())
        overlap = float(np.logical_and(predicted, reference).sum())
        counts.dice_sum = 2 * overlap / float(predicted.sum() + reference.sum())
        counts.dice_studies = 1
        truth = reference_lesions(reference, outputs.min_lesion_volume_mm3, sample.voxel_mm3)
        counts.lesions_total = len(set(np.unique(truth).tolist()) - {0})
        counts.lesions_found = len(set(np.unique(truth[predicted]).tolist()) - {0})
    positive_call = study_score >= outputs.codes.positive_threshold
    if sample.label < 0:  # unknown: counted nowhere in the study-level figures
        return counts
    if sample.label:
        counts.true_positive, counts.false_negative = int(positive_call), int(not positive_call)
        counts.positive_scores[score_bin(study_score)] += 1
    else:
        counts.false_positive, counts.true_negative = int(positive_call), int(not positive_call)
        counts.negative_scores[score_bin(study_score)] += 1
    return counts


@torch.no_grad()
def predict_samples(
    model: nn.Module, samples: Sequence[TrainingSample], spec: TaskSpec, arbiter: DeviceArbiter | None = None
) -> Iterator[Prediction]:
    """Sliding-window inference of a torch model over whole studies, as the node runs it. With the node's
    ``arbiter`` (a site evaluating beside it), each batch of windows takes its turn as a training step does:
    clinical jobs first."""
    model.eval()
    device = next(model.parameters()).device

    def run_batch(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        with arbiter.training_step() if arbiter is not None else nullcontext():
            seg, cls = model(torch.from_numpy(batch).to(device))
            return seg.float().cpu().numpy(), cls.float().cpu().numpy()

    windows_per_run = max(4, spec.plan.batch_size if spec.plan is not None else 4)
    for sample in samples:
        yield predict_study(sample.image.astype(np.float32), spec, run_batch, batch_size=windows_per_run)


def predictions_counts(
    samples: Sequence[TrainingSample], predictions: Iterable[Prediction], spec: TaskSpec
) -> Iterator[tuple[TrainingSample, EvaluationCounts]]:
    """Each study's own counts from the model's predictions of it (they stay at the site: the bias checks group
    them by subgroup)."""
    for sample, prediction in zip(samples, predictions, strict=True):
        score = prediction.study_score(spec.outputs.study_score)
        yield sample, study_counts(prediction.probability, score, sample, spec)


def evaluate_model(
    model: nn.Module, samples: Sequence[TrainingSample], spec: TaskSpec, arbiter: DeviceArbiter | None = None
) -> EvaluationCounts:
    """The evaluation counts of a torch model over whole held-out studies."""
    return pooled_counts(samples, predict_samples(model, samples, spec, arbiter), spec)


def pooled_counts(
    samples: Sequence[TrainingSample], predictions: Iterable[Prediction], spec: TaskSpec
) -> EvaluationCounts:
    """The evaluation counts of studies from the model's predictions of them, added up."""
    return sum((counts for _, counts in predictions_counts(samples, predictions, spec)), EvaluationCounts())
