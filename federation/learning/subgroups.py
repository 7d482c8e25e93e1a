"""Bias checks: the final model's evaluation per subgroup the sites can read from DICOM headers (scanner vendor,
field strength, age band, sex), pooled over sites, with 95 % confidence intervals and the largest gap.

A site sends, per subgroup, only the sums pooled Dice and AUC need (studies; Dice's count, sum and sum of
squares; the study-score histogram per label), and only for cells of at least ``k`` studies
(``bias-min-cell``). Each figure in a cell rests on >= k studies (Dice on >= k studies with a reference lesion,
the histograms on >= k of each label), and the cells held back of one attribute hold 0 or >= k studies in all
(more cells are held back, smallest first, until they do): the site's totals, which leave the site anyway,
minus the released cells never isolate fewer than k studies. The allow-list checks every cell
(``subgroup_cells.cell_problem``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy import stats

from radfed.federation.learning.cohort import folder_studies, study_key
from radfed.federation.learning.datasets import is_dataset_folder
from radfed.federation.learning.evaluation import EvaluationCounts, histogram_auc
from radfed.federation.learning.messages import SCORE_BINS
from radfed.federation.learning.subgroup_cells import (
    HEAD,
    SUPPRESSED,
    Attribute,
    StudySubgroups,
    cell_name,
    cell_problem,
    parse_cell_name,
    subgroups_from_header,
)
from radfed.inference.dicom.study_source import SEG_MODALITY, OrthancStudy, StudySource
from radfed.inference.errors import RadfedError
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint

logger = logging.getLogger(__name__)
Z95 = 1.959964


@dataclass
class CellStatistics:
    """The sums of one subgroup (at a site, or pooled): what pooled Dice and AUC with intervals need."""

    studies: int = 0
    dice_studies: int = 0
    dice_sum: float = 0.0
    dice_squares: float = 0.0
    positive: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    negative: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)

    @property
    def labelled(self) -> tuple[int, int]:
        return sum(self.positive), sum(self.negative)

    def add_study(self, counts: EvaluationCounts) -> None:
        """One study's evaluation counts (``dice_sum`` is its own Dice when it has a reference lesion)."""
        self.studies += counts.studies
        self.dice_studies += counts.dice_studies
        self.dice_sum += counts.dice_sum
        self.dice_squares += counts.dice_sum**2
        self.positive = [a + b for a, b in zip(self.positive, counts.positive_scores, strict=True)]
        self.negative = [a + b for a, b in zip(self.negative, counts.negative_scores, strict=True)]

    def add(self, other: CellStatistics) -> None:
        self.studies += other.studies
        self.dice_studies += other.dice_studies
        self.dice_sum += other.dice_sum
        self.dice_squares += other.dice_squares
        self.positive = [a + b for a, b in zip(self.positive, other.positive, strict=True)]
        self.negative = [a + b for a, b in zip(self.negative, other.negative, strict=True)]

    def vector(self, k: int, *, dice: bool, scores: bool) -> list[float]:
        """The cell as it leaves the site; Dice's part and the histograms zero where they are held back."""
        head = [k, self.studies, self.dice_studies, self.dice_sum, self.dice_squares] if dice else [k, self.studies]
        histograms = [*self.positive, *self.negative] if scores else [0] * (2 * SCORE_BINS)
        return [float(v) for v in (*head, *[0] * (HEAD - len(head)), *histograms)]

    @classmethod
    def from_vector(cls, vector: Sequence[float]) -> CellStatistics:
        _, studies, dice_studies, dice_sum, dice_squares = (float(v) for v in vector[:HEAD])
        scores = [int(v) for v in vector[HEAD:]]
        return cls(int(studies), int(dice_studies), dice_sum, dice_squares, scores[:SCORE_BINS], scores[SCORE_BINS:])

    def summary(self) -> dict[str, Any]:
        """Studies, Dice and AUC with 95 % intervals (None where the cell holds no such figure)."""
        dice, dice_ci, dice_se = mean_interval(self.dice_sum, self.dice_squares, self.dice_studies)
        auc, auc_ci, auc_se = auc_interval(self.positive, self.negative)
        positives, negatives = self.labelled
        return {
            "studies": self.studies,
            "dice_studies": self.dice_studies,
            "dice": dice,
            "dice_ci": dice_ci,
            "dice_se": dice_se,
            "positives": positives,
            "negatives": negatives,
            "auc": auc,
            "auc_ci": auc_ci,
            "auc_se": auc_se,
        }


Interval = tuple[float | None, list[float] | None, float | None]  # estimate, [low, high], standard error


def mean_interval(total: float, squares: float, n: int) -> Interval:
    """Mean with a t interval, from the sum and sum of squares of n values."""
    if n < 1:
        return None, None, None
    mean = total / n
    if n < 2:
        return mean, None, None
    variance = max(0.0, (squares - n * mean * mean) / (n - 1))
    se = math.sqrt(variance / n)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return mean, [max(0.0, mean - half), min(1.0, mean + half)], se


def auc_interval(positive: Sequence[int], negative: Sequence[int]) -> Interval:
    """AUC of binned scores with DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988), exact on the bins:
    each positive's placement is the share of negatives below its bin plus half of those in it, and the other
    way round; a tie within a bin counts one half, as ``histogram_auc`` counts it."""
    auc = histogram_auc(positive, negative)
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    m, n = pos.sum(), neg.sum()
    if auc is None or m < 2 or n < 2:
        return auc, None, None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    above = np.concatenate([np.cumsum(pos[::-1])[::-1][1:], [0.0]])
    v10 = (below + 0.5 * neg) / n  # per bin, for each positive in it
    v01 = (above + 0.5 * pos) / m  # per bin, for each negative in it
    s10 = float((pos * (v10 - auc) ** 2).sum() / (m - 1))
    s01 = float((neg * (v01 - auc) ** 2).sum() / (n - 1))
    se = math.sqrt(s10 / m + s01 / n)
    return auc, [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)], se


# --- at the site ---


def released(counts: Mapping[str, Sequence[int]], candidates: Iterable[str], k: int) -> set[str]:
    """The candidate cells whose every count is >= k, less the fewest more (smallest first) until what is held
    back of each count, over all cells, is 0 or >= k."""
    keep = {c for c in candidates if all(n >= k for n in counts[c])}
    width = max((len(v) for v in counts.values()), default=0)
    while keep:
        held = [sum(counts[c][i] for c in counts if c not in keep) for i in range(width)]
        short = next((i for i, h in enumerate(held) if 0 < h < k), None)
        if short is None:
            break
        keep.remove(min(keep, key=lambda c: (counts[c][short], c)))
    return keep


def subgroup_metrics(studies: Sequence[tuple[EvaluationCounts, StudySubgroups]], k: int) -> dict[str, list[float]]:
    """A site's bias-check metrics from its held-out studies' own counts: the cells that may leave, and per
    attribute the studies in the cells held back."""
    metrics: dict[str, list[float]] = {}
    held_back: list[float] = []
    for attribute in Attribute:
        cells: dict[str, CellStatistics] = {}
        for counts, groups in studies:
            cells.setdefault(groups.value(attribute), CellStatistics()).add_study(counts)
        shown = released({v: (c.studies,) for v, c in cells.items()}, cells, k)
        dice = released({v: (c.dice_studies,) for v, c in cells.items()}, shown, k)
        scores = released({v: c.labelled for v, c in cells.items()}, shown, k)
        for value in sorted(shown):
            metrics[cell_name(attribute, value)] = cells[value].vector(k, dice=value in dice, scores=value in scores)
        held_back.append(float(sum(c.studies for v, c in cells.items() if v not in shown)))
    metrics[SUPPRESSED] = held_back
    return metrics


def image_header(study: StudySource) -> Dataset | None:
    """The header of the study's first image (one instance read), None for a study without one."""
    for info in study.series():
        if info.modality == SEG_MODALITY or not info.slices:
            continue
        located = study.instances(info)
        if located:
            return study.datasets_at([located[0][0]])[0]
    return None


def _studies(sources: Iterable[str]) -> Iterator[StudySource]:
    for source in sources:
        if source.startswith(("http://", "https://")):
            with OrthancClient(OrthancEndpoint.from_url(source)) as client:
                yield from (OrthancStudy(client, study_id) for study_id in client.studies())
        elif not is_dataset_folder(Path(source)):  # a dataset folder's cases have no DICOM header
            yield from (study for study, _, _ in folder_studies(Path(source)) if study is not None)


def study_subgroups(sources: Iterable[str], keys: Collection[str]) -> dict[str, StudySubgroups]:
    """The subgroups of the studies with these cohort keys, from one image header each (missing: unknown)."""
    found: dict[str, StudySubgroups] = {}
    if not keys:
        return found
    for study in _studies(sources):
        key = study_key(study.study_instance_uid)
        if key not in keys or key in found:
            continue
        try:
            found[key] = subgroups_from_header(image_header(study))
        except RadfedError as exc:
            logger.info("subgroups: study %s header unreadable (%s)", key, type(exc).__name__)
    return found


# --- at the coordinator ---


def site_cells(metrics: Mapping[str, object], k: int) -> dict[tuple[Attribute, str], CellStatistics]:
    """The cells one site sent (a cell for a smaller minimum than the job's is left out)."""
    cells: dict[tuple[Attribute, str], CellStatistics] = {}
    for name, value in metrics.items():
        parsed = parse_cell_name(name)
        if parsed is None or not isinstance(value, list):
            continue
        vector = [float(v) for v in value]
        if cell_problem(name, vector, SCORE_BINS) is None and vector[0] >= k:
            cells[parsed] = CellStatistics.from_vector(vector)
    return cells


def largest_gap(cells: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, Any] | None:
    """The largest difference in ``metric`` between two subgroups of one attribute, with a normal 95 %
    interval of that difference (the two estimates taken as independent)."""
    defined = {v: s for v, s in cells.items() if s.get(metric) is not None and v != "unknown"}
    if len(defined) < 2:
        return None
    high = max(defined, key=lambda v: (defined[v][metric], v))
    low = min(defined, key=lambda v: (defined[v][metric], v))
    gap = float(defined[high][metric] - defined[low][metric])
    errors = [defined[v].get(f"{metric}_se") for v in (high, low)]
    ci = None
    if all(e is not None for e in errors):
        half = Z95 * math.sqrt(sum(float(e) ** 2 for e in errors if e is not None))
        ci = [gap - half, gap + half]
    return {"high": high, "low": low, "gap": gap, "ci": ci}


def subgroup_table(site_metrics: Mapping[str, Mapping[str, object]], k: int) -> dict[str, Any] | None:
    """The pooled bias checks (None when no site sent a cell): per attribute and subgroup the summary, the
    studies held back at the sites, the largest Dice and AUC gaps; and each site's own cells."""
    per_site = {site: site_cells(metrics, k) for site, metrics in sorted(site_metrics.items())}
    if not any(per_site.values()):
        return None
    pooled: dict[Attribute, dict[str, CellStatistics]] = {a: {} for a in Attribute}
    for cells in per_site.values():
        for (attribute, value), cell in cells.items():
            pooled[attribute].setdefault(value, CellStatistics()).add(cell)
    attributes: dict[str, Any] = {}
    for index, attribute in enumerate(Attribute):
        summaries = {v: c.summary() for v, c in sorted(pooled[attribute].items())}
        held = [m.get(SUPPRESSED) for m in site_metrics.values()]
        attributes[attribute.value] = {
            "cells": summaries,
            "held_back_studies": int(sum(float(h[index]) for h in held if isinstance(h, list) and len(h) > index)),
            "gaps": {metric: largest_gap(summaries, metric) for metric in ("dice", "auc")},
        }
    return {
        "min_cell": k,
        "attributes": attributes,
        "sites": {
            site: {f"{a.value}.{v}": c.summary() for (a, v), c in sorted(cells.items())}
            for site, cells in per_site.items()
        },
    }


def _estimate(summary: Mapping[str, Any], metric: str) -> str:
    value, ci = summary.get(metric), summary.get(f"{metric}_ci")
    if value is None:
        return "n/a"
    return f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{value:.3f}"


def _gap(gap: Mapping[str, Any] | None) -> str:
    if gap is None:
        return "n/a"
    ci = gap.get("ci")
    interval = f" (95 % CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""
    return f"{gap['gap']:.3f}{interval}, {gap['high']} vs {gap['low']}"


def table_rows(table: Mapping[str, Any]) -> tuple[list[str], list[list[object]]]:
    """The pooled subgroups as a table (header, rows) for the report."""
    header = ["attribute", "subgroup", "studies", "Dice (95 % CI)", "AUC (95 % CI)", "positives / negatives"]
    rows: list[list[object]] = []
    for attribute, found in table["attributes"].items():
        for value, s in found["cells"].items():
            labels = f"{s['positives']} / {s['negatives']}"
            rows.append([attribute, value, s["studies"], _estimate(s, "dice"), _estimate(s, "auc"), labels])
        rows.append([attribute, "largest Dice gap", "", _gap(found["gaps"]["dice"]), "", ""])
        rows.append([attribute, "largest AUC gap", "", "", _gap(found["gaps"]["auc"]), ""])
        rows.append([attribute, "held back at the sites", found["held_back_studies"], "", "", ""])
    return header, rows


def card_section(table: Mapping[str, Any] | None, k: int) -> str:
    """The model card's section on the bias checks (Markdown)."""
    lines = ["## Bias checks", ""]
    if table is None:
        return "\n".join([*lines, f"No subgroup of at least {k} held-out studies at any site."])
    lines += [
        "The final model on the sites' held-out studies per subgroup read from DICOM headers, pooled over sites."
        f" A site sends a subgroup only with at least {k} studies (`bias-min-cell`), Dice only over >= {k} studies"
        f" with a reference lesion, AUC only with >= {k} studies of each label; what it holds back of an attribute"
        f" is 0 or >= {k} studies. Dice: mean with a t interval; AUC: from binned scores, DeLong interval. The"
        " largest gap is between the best and worst subgroup of an attribute (not counting unknown); with few"
        " studies the intervals are wide and the largest of several gaps is biased upward.",
        "",
        "| attribute | subgroup | studies | Dice (95 % CI) | AUC (95 % CI) | positives / negatives |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table_rows(table)[1]]
    return "\n".join(lines)
