"""What may cross the site boundary: model arrays and an allow-list of scalar metrics, nothing else.

Every ClientApp reply is built here, so one place enforces that no pixel data, mask, DICOM header or
identifier ever leaves a site."""

from __future__ import annotations

import math
from collections.abc import Mapping

# Counts and aggregate scalars only: never per-study values, UIDs or text.
ALLOWED_METRICS = frozenset(
    {
        "num-examples",
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
    }
)


class MetricLeakError(ValueError):
    """A reply tried to carry something outside the allow-list."""


def allowed_metrics(values: Mapping[str, float | int]) -> dict[str, float | int]:
    """Check a metric dict against the allow-list (names and finite scalar values)."""
    clean: dict[str, float | int] = {}
    for name, value in values.items():
        if name not in ALLOWED_METRICS:
            raise MetricLeakError(f"metric {name!r} is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
            raise MetricLeakError(f"metric {name!r} must be a finite number, got {value!r}")
        clean[name] = value
    return clean
