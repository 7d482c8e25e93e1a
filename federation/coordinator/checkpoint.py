"""The coordinator's bookkeeping, free of Flower: the job's durable state (checkpoint + harmonisation),
reference landmarks from the sites' statistics, pooled evaluation, and the model card.

The ServerApp (radfed.federation.coordinator.server_app) does the messaging and calls these."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from radfed.federation.job.alerts import PoisoningAlert, pseudonymised
from radfed.federation.learning.calibration import GAIN_STANDARD_ERRORS, Calibration
from radfed.federation.learning.evaluation import WITHHELD, EvaluationCounts

CHECKPOINT = "checkpoint.npz"
JOB_STATE = "job-state.json"
METRICS = "metrics.jsonl"


class QuorumError(RuntimeError):
    """Too few sites answered, after the allowed retries; the message says how many and which."""


@dataclass
class CoordinatorCheckpoint:
    """What a restarted coordinator needs to resume: the last finished round, its global model (and the
    server optimiser's state: FedAvgM's velocity, FedAdam's moments), the federation's harmonisation and what each
    site has reported so far."""

    completed_round: int = 0
    arrays: list[npt.NDArray[Any]] = field(default_factory=list)
    harmonisation: dict[str, list[float]] | None = None
    studies_per_site: dict[str, int] = field(default_factory=dict)
    epsilon_per_site: dict[str, float] = field(default_factory=dict)
    server_state: list[npt.NDArray[Any]] | None = None
    plan: str | None = None  # the job's plan (JSON), fixed before round 1
    # per site: summed kept reference volume per share (learning.calibration.FRACTIONS) and its study count
    lesion_kept_per_site: dict[str, tuple[list[float], int]] = field(default_factory=dict)
    flags: list[PoisoningAlert] = field(default_factory=list)  # every site the screening flagged, by its name
    # per site: reference lesion volume spanning two or more slices, and all of it (mm3)
    lesion_extent_per_site: dict[str, tuple[float, float]] = field(default_factory=dict)
    job_instance: str = ""  # this run of the job (run_config.JOB_INSTANCE_KEY); "" in checkpoints before it

    def alerts(self, anonymise: bool) -> tuple[PoisoningAlert, ...]:
        """The job's flags as every site hears of them (pseudonyms when the job's policy says so)."""
        return pseudonymised(self.flags) if anonymise else tuple(self.flags)

    def lesion_fraction(self) -> float:
        """The share-of-largest rule from every site's reference masks (sums of sums: exact pooling)."""
        from radfed.federation.learning.calibration import FRACTIONS, fraction_from_kept

        kept = [0.0] * len(FRACTIONS)
        studies = 0
        for site_kept, site_studies in self.lesion_kept_per_site.values():
            kept = [a + b for a, b in zip(kept, site_kept, strict=True)]
            studies += site_studies
        return fraction_from_kept(kept, studies)

    def lesion_slices(self) -> int:
        """The minimum slice extent from every site's reference masks (summed volumes: exact pooling)."""
        from radfed.federation.learning.calibration import slices_from_kept

        kept = sum(k for k, _ in self.lesion_extent_per_site.values())
        return slices_from_kept(kept, sum(t for _, t in self.lesion_extent_per_site.values()))

    def save(self, out: Path) -> None:
        """Checkpoint after every round; both files are replaced atomically (arrays first)."""
        partial = out / (CHECKPOINT + ".partial.npz")
        saved = {f"a{i}": a for i, a in enumerate(self.arrays)} | {
            f"v{i}": v for i, v in enumerate(self.server_state or [])
        }
        np.savez(partial, **saved)  # type: ignore[arg-type]
        partial.replace(out / CHECKPOINT)
        meta = {
            "completed_round": self.completed_round,
            "harmonisation": self.harmonisation,
            "studies_per_site": self.studies_per_site,
            "epsilon_per_site": self.epsilon_per_site,
            "plan": self.plan,
            "lesion_kept_per_site": self.lesion_kept_per_site,
            "flags": [f.as_dict() for f in self.flags],
            "lesion_extent_per_site": self.lesion_extent_per_site,
            "job_instance": self.job_instance,
        }
        temporary = out / (JOB_STATE + ".tmp")
        temporary.write_text(json.dumps(meta, indent=1))
        temporary.replace(out / JOB_STATE)

    @classmethod
    def load(cls, out: Path) -> CoordinatorCheckpoint | None:
        if not (out / JOB_STATE).is_file() or not (out / CHECKPOINT).is_file():
            return None
        meta = json.loads((out / JOB_STATE).read_text())
        saved = np.load(out / CHECKPOINT)
        arrays = [saved[f"a{i}"] for i in range(sum(name.startswith("a") for name in saved.files))]
        server_state = [saved[f"v{i}"] for i in range(sum(name.startswith("v") for name in saved.files))]
        return cls(
            int(meta["completed_round"]),
            arrays,
            meta.get("harmonisation"),
            dict(meta.get("studies_per_site", {})),
            dict(meta.get("epsilon_per_site", {})),
            server_state or None,
            meta.get("plan"),
            {site: (list(kept), int(n)) for site, (kept, n) in meta.get("lesion_kept_per_site", {}).items()},
            [PoisoningAlert.from_dict(f) for f in meta.get("flags", [])],
            {site: (float(k), float(t)) for site, (k, t) in meta.get("lesion_extent_per_site", {}).items()},
            str(meta.get("job_instance", "")),
        )


def reference_landmarks(
    site_landmarks: Mapping[str, Mapping[str, Sequence[float]]], site_weights: Mapping[str, int]
) -> dict[str, list[float]]:
    """One reference scale per channel: the study-weighted mean of the sites' mean landmarks, made strictly
    increasing (the piecewise-linear mapping needs that)."""
    sites = [s for s in site_landmarks if site_weights.get(s, 0) > 0]
    if not sites:
        raise QuorumError("no site sent intensity landmarks: harmonisation cannot start")
    channels = set(site_landmarks[sites[0]])
    combined: dict[str, list[float]] = {}
    for channel in sorted(channels):
        stack = np.array([site_landmarks[s][channel] for s in sites], dtype=np.float64)
        weights = np.array([site_weights[s] for s in sites], dtype=np.float64)
        mean = (stack * weights[:, None]).sum(axis=0) / weights.sum()
        combined[channel] = np.maximum.accumulate(mean + np.arange(len(mean)) * 1e-6).tolist()
    return combined


def landmark_metrics(metrics: Mapping[str, Any]) -> dict[str, list[float]]:
    return {k.removeprefix("landmarks."): list(v) for k, v in metrics.items() if k.startswith("landmarks.")}


def evaluation_line(site_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per-site and pooled evaluation from the sites' counts, and the sites that withheld theirs
    (``evaluation-min-studies``); None when no site evaluated or withheld."""
    per_site = {s: c for s, m in site_metrics.items() if (c := EvaluationCounts.from_metrics(m)) is not None}
    withheld = sorted(s for s, m in site_metrics.items() if m.get(WITHHELD))
    if not per_site and not withheld:
        return None
    pooled = EvaluationCounts()
    for counts in per_site.values():
        pooled = pooled + counts
    return {
        "sites": {s: c.summary() for s, c in sorted(per_site.items())},
        "withheld": withheld,
        "pooled": pooled.summary(),
        "scores": {
            "pooled": {"positive": pooled.positive_scores, "negative": pooled.negative_scores},
            **{s: {"positive": c.positive_scores, "negative": c.negative_scores} for s, c in per_site.items()},
        },
    }


def append_metrics(out: Path, line: Mapping[str, Any]) -> None:
    with (out / METRICS).open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / METRICS
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def model_card(
    *,
    job: str,
    model_key: str,
    rounds: int,
    aggregation: str,
    state: CoordinatorCheckpoint,
    local_steps: int = 0,
    epsilon_budget: float,
    delta: float,
    final_evaluation: Mapping[str, Any] | None,
    base_model: str | None = None,
    alerts: Sequence[PoisoningAlert] = (),
    sections: Sequence[str] = (),
) -> str:
    """The model card a federation operator hands to the hospitals (Markdown); ``sections``: more Markdown
    sections, before the closing line."""

    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else ("n/a" if value is None else str(value))

    lines = [
        f"# Model card: {model_key}",
        "",
        f"- Federated job `{job}`: {rounds} rounds"
        + (
            f" x {local_steps} local steps ({rounds * local_steps} training steps at each site; the averaged model "
            "takes about as many, however many sites train)"
            if local_steps
            else ""
        )
        + f", aggregation `{aggregation}`.",
        "- Starting model: " + (f"fine-tuned from base model {base_model}" if base_model else "random initial weights"),
        "- Harmonisation: " + ("shared intensity landmarks per channel" if state.harmonisation else "none"),
        "- Differential privacy: "
        + (f"DP-SGD, budget epsilon {epsilon_budget:g} at delta {delta:g} per site" if epsilon_budget > 0 else "off"),
        "",
        "| site | training studies | epsilon spent | Dice | lesion sensitivity | AUC | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    sites = final_evaluation["sites"] if final_evaluation else {}
    for site in sorted(set(state.studies_per_site) | set(sites)):
        m = sites.get(site, {})
        lines.append(
            f"| {site} | {state.studies_per_site.get(site, 'n/a')} | {fmt(state.epsilon_per_site.get(site))} | "
            + " | ".join(fmt(m.get(k)) for k in ("dice", "lesion_sensitivity", "auc", "sensitivity", "specificity"))
            + " |"
        )
    if final_evaluation:
        p = final_evaluation["pooled"]
        lines.append(
            f"| **pooled** | {sum(state.studies_per_site.values())} | | "
            + " | ".join(fmt(p.get(k)) for k in ("dice", "lesion_sensitivity", "auc", "sensitivity", "specificity"))
            + " |"
        )
    lines += ["", "Evaluation: each site's held-out studies (never trained on), with the node's own postprocessing."]
    if withheld := (final_evaluation or {}).get("withheld"):
        lines.append(
            f"{', '.join(withheld)} held out fewer studies than `evaluation-min-studies` and sent no figures (from so "
            "few they would be those patients' own): the pooled row leaves them out."
        )
    lines += ["", "## Poisoning alerts", ""]
    if alerts:
        lines += [
            "The coordinator's screening flagged these updates and left them out of their round's aggregation;"
            " every site received each alert with the next message of the job.",
            "",
            "| round | site | rule | alert id |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a.server_round} | {a.site} | {a.rule} | {a.alert_id} |" for a in alerts]
    else:
        lines.append(f"None: no site's update was flagged in {rounds} rounds.")
    lines += [line for section in sections if section for line in ("", section)]
    lines += ["", "Research use only; not a medical device."]
    return "\n".join(lines) + "\n"


def calibration_section(
    calibration: Calibration | None, default_threshold: float, withheld: Sequence[str], min_studies: int
) -> str:
    """The model card's account of the output settings chosen from the sites' held-out sums, and of the sites
    that held theirs back (fewer than ``calibration-min-studies`` held-out studies)."""
    held_back = (
        f"{', '.join(withheld)} held out fewer than {min_studies} studies (`calibration-min-studies`) and sent no "
        "sums: with fewer, a sum would be one study's own figures."
        if withheld
        else ""
    )
    if calibration is None:
        if not withheld:
            return ""
        return "\n".join(["## Output calibration", "", f"None: {held_back} The spec's output settings stay."])
    c = calibration
    kept = "; none did, so the spec's lesion settings stay" if c.kept_reference else ""
    return "\n".join(
        [
            "## Output calibration",
            "",
            f"Chosen on the sites' {c.studies} held-out studies from their summed Dice per setting (no study's own "
            f"figure left its site): lesion threshold {c.lesion_threshold:g}, minimum lesion volume "
            f"{c.min_lesion_volume_mm3:g} mm3, share of the study's largest {c.min_lesion_fraction:g}, study "
            f"temperature {c.study_temperature:.3g}. Mean per-study Dice on those studies at these settings: "
            f"{c.validation_dice:.3f} ({c.reference_dice:.3f} at the spec's). A setting replaces the spec's only when "
            f"its mean gain exceeds {GAIN_STANDARD_ERRORS:g} standard error of the studies' paired differences (the "
            f"one-standard-error rule){kept}. The table above is at the spec's threshold {default_threshold:g}; a "
            "figure chosen and measured on the same studies is optimistic, the test is the next study a hospital "
            "scans." + (f" {held_back}" if held_back else ""),
        ]
    )
