"""What may cross the site boundary: model arrays and an allow-list of scalar metrics, nothing else.

Every ClientApp reply is built here, so one place enforces that no pixel data, mask, DICOM header or
identifier ever leaves a site. The one thing the coordinator tells every site about another, a poisoning
alert, is held to its own allow-list here too (``allowed_alert``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from radfed.federation.learning.subgroup_cells import CELL_PREFIX, SUPPRESSED, Attribute, cell_problem
from radfed.inference.pipeline.landmarks import LANDMARK_PERCENTILES

# Counts and aggregate scalars only: never per-study values, UIDs or text.
ALLOWED_METRICS = frozenset(
    {
        "num-examples",
        "update_clipped",  # secure aggregation: 1 when the site scaled its update down to update-clip-norm
        "studies_found",
        "studies_usable",
        "studies_rejected",
        "label_positive",
        "label_negative",
        "train_loss",
        "train_steps",
        "train_seconds",
        "epsilon",
        "delta",
        "dice",
        "lesion_sensitivity",
        "auc",
        "sensitivity",
        "specificity",
        "f1",
        "eval_studies",
        "eval_dice_sum",
        "eval_dice_studies",
        "eval_lesions_total",
        "eval_lesions_found",
        "eval_tp",
        "eval_fp",
        "eval_tn",
        "eval_fn",
        "eval_fp_components",
        "eval_predicted_voxels",
        "eval_reference_voxels",
        "label_unknown",
        "landmark_studies",
        "fingerprint_studies",
        "model_installed",
        "evaluation_seconds",
        # where a round's time goes at the site (federation/site/client_app.py): timings, never data
        "site_seconds",
        "clientapp_seconds",
        "clientapp_start_seconds",
        "round_replayed",  # 1: the site sent its stored reply for a round it had trained (federation/site/rounds.py)
        "train_paused_seconds",  # the site's training waited for clinical work on the node's device
        "lesion_kept_studies",  # training studies with reference lesions (the share-of-largest rule)
        # summed over the site's training studies, in mm3: reference lesion volume spanning at least two slices,
        # and all of it (the minimum slice extent, federation/learning/calibration.py)
        "lesion_extent_kept_mm3",
        "lesion_extent_total_mm3",
        # output calibration of the final model on the site's held-out studies (federation/learning/calibration.py):
        # how many studies the Dice sums cover, how many have a known label and how many of those are positive
        "calibration_studies",
        "calibration_labelled",
        "calibration_positive",
        "calibration_withheld",  # 1: the site held out fewer than calibration-min-studies and sent no sums
        "evaluation_withheld",  # 1: the site held out fewer than evaluation-min-studies and sent no eval_* figures
        # the membership-inference audit of the final model (federation/learning/membership.py): each attack's AUC and
        # TPR at 1 % FPR over the site's training vs held-out studies, their counts; never a per-study score
        "membership_loss_auc",
        "membership_loss_tpr_at_1pct_fpr",
        "membership_lira_auc",
        "membership_lira_tpr_at_1pct_fpr",
        "membership_members",
        "membership_non_members",
        "membership_references",
        "membership_seconds",
    }
)
# Aggregate vectors: binned study-score counts (evaluation) and mean intensity landmarks per channel
# (harmonisation). Never per-study values.
SCORE_BINS = 64  # study-score histogram bins (federation/learning/evaluation.py)
# Summed over a site's training studies, per share in calibration.FRACTIONS: the part of their reference lesion
# volume in components of at least that share of the study's largest (federation/learning/calibration.py).
LESION_KEPT_LENGTH = 5
# Summed over a site's held-out studies: Dice per output setting (calibration.setting_grid: 7 thresholds x 6
# minimum volumes x 6 shares), its squared gain over the reference setting (the spread of the gain), and the
# study labels' negative log-likelihood per temperature (25).
CALIBRATION_GRID_LENGTH = 252
TEMPERATURE_COUNT = 25
ALLOWED_VECTORS = {
    "eval_scores_positive": SCORE_BINS,
    "eval_scores_negative": SCORE_BINS,
    "lesion_kept": LESION_KEPT_LENGTH,
    "calibration_dice": CALIBRATION_GRID_LENGTH,
    "calibration_gain_sq": CALIBRATION_GRID_LENGTH,
    "calibration_nll": TEMPERATURE_COUNT,
    SUPPRESSED: len(Attribute),  # bias checks: per attribute, the studies in subgroups held back (subgroups.py)
}
LANDMARK_PREFIX = "landmarks."
LANDMARK_LENGTH = len(LANDMARK_PERCENTILES)
# A site's dataset fingerprint for the job's plan (federation/job/planning.py): median and 10th-percentile
# spacing, median shape (3 each), and per channel the pooled foreground voxels, mean, std, 0.5/99.5 %.
FINGERPRINT_PREFIX = "fingerprint."
FINGERPRINT_LENGTHS = {"spacing": 3, "low_spacing": 3, "shape": 3, "channel": 5}


class MetricLeakError(ValueError):
    """A reply tried to carry something outside the allow-list."""


# A poisoning alert (federation/job/alerts.py), coordinator -> every site: which round, which site's update (its
# federation id, or a pseudonym), which screening rule. Never the measured values, a reason text or anything
# a site sent.
ALERT_FIELDS = frozenset({"round", "site", "rule"})
# aggregation.AnomalyRule's values (a test keeps them equal)
ALERT_RULES = frozenset({"update-norm", "update-direction", "update-not-finite"})
# A federation id: the SuperNode's site-name (set by its admin) or node-<id>; no spaces, no free text.
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AlertLeakError(MetricLeakError):
    """A poisoning alert with a field outside its allow-list, or a value that is not an id, rule or round."""


def allowed_alert(entry: object) -> dict[str, int | str]:
    """Check one alert entry of a round's config: exactly ``ALERT_FIELDS``, a round >= 1, a federation id and a
    screening rule's name."""
    if not isinstance(entry, Mapping) or set(entry) != ALERT_FIELDS:
        keys = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise AlertLeakError(f"a poisoning alert holds exactly {sorted(ALERT_FIELDS)}, got {keys}")
    round_, site, rule = entry["round"], entry["site"], entry["rule"]
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
        raise AlertLeakError(f"a poisoning alert's round must be an integer >= 1, got {round_!r}")
    if not isinstance(site, str) or not SITE_ID.fullmatch(site):
        raise AlertLeakError(f"a poisoning alert's site must be a federation id, got {site!r}")
    if rule not in ALERT_RULES:
        raise AlertLeakError(f"a poisoning alert's rule must be one of {sorted(ALERT_RULES)}, got {rule!r}")
    return {"round": round_, "site": site, "rule": str(rule)}


MetricValue = float | int | list[int] | list[float]


def _vector_length(name: str) -> int | None:
    if name.startswith(LANDMARK_PREFIX):
        return LANDMARK_LENGTH
    if name.startswith(FINGERPRINT_PREFIX):
        return FINGERPRINT_LENGTHS.get(name.removeprefix(FINGERPRINT_PREFIX).split(".")[0])
    return ALLOWED_VECTORS.get(name)


def _allowed_vector(name: str, value: object) -> bool:
    length = _vector_length(name)
    return (
        length is not None
        and isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def allowed_metrics(values: Mapping[str, MetricValue]) -> dict[str, MetricValue]:
    """Check a metric dict against the allow-list (names; finite scalars, or the fixed-length vectors)."""
    clean: dict[str, MetricValue] = {}
    for name, value in values.items():
        if name.startswith(CELL_PREFIX):  # a bias-check subgroup: closed vocabulary, >= k studies per figure
            problem = cell_problem(name, value, SCORE_BINS) if isinstance(value, list) else "must be a vector"
            if problem is not None:
                raise MetricLeakError(f"subgroup cell {name!r} may not leave the site: {problem}")
            clean[name] = value
            continue
        if isinstance(value, list):
            if not _allowed_vector(name, value):
                raise MetricLeakError(f"metric {name!r} is not an allowed aggregate vector")
            clean[name] = value
            continue
        if name not in ALLOWED_METRICS:
            raise MetricLeakError(f"metric {name!r} is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
            raise MetricLeakError(f"metric {name!r} must be a finite number, got {value!r}")
        clean[name] = value
    return clean
