"""A static HTML report of a federated job, for people: training curves per site and pooled, per-site Dice
and AUC, ROC curves, DP budget spent, site differences before and after harmonisation, and sample slices
with the AI outline over the image as the radiologist sees it. PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class SiteIntensities:
    """One site's view of one channel for the harmonisation figure (the demo runs every site on one
    machine; at real hospitals only the landmark statistics would ever be pooled)."""

    site: str
    before: npt.NDArray[np.float32]  # the task's own normalisation, foreground voxels
    after: npt.NDArray[np.float32]  # mapped onto the federation's reference landmarks, same voxels


@dataclass(frozen=True)
class SampleSlice:
    title: str
    image: npt.NDArray[np.floating]  # one slice (rows, columns)
    outline: npt.NDArray[np.bool_]  # the AI lesion mask on that slice
    caption: str


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def first_order_features(values: npt.NDArray[np.floating]) -> dict[str, float]:
    """First-order radiomics features (IBSI-style definitions) of a set of intensities."""
    v = np.asarray(values, dtype=np.float64)
    mean, std = float(v.mean()), float(v.std())
    centred = v - mean
    histogram, _ = np.histogram(v, bins=64)
    p = histogram[histogram > 0] / v.size
    return {
        "mean": mean,
        "std": std,
        "skewness": float((centred**3).mean() / max(std**3, 1e-12)),
        "kurtosis": float((centred**4).mean() / max(std**4, 1e-12)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "entropy": float(-(p * np.log2(p)).sum()),
    }


class ReportWriter:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.sections: list[str] = []
        self.plt = _plt()

    def figure(self, name: str, title: str, fig: Any, caption: str = "") -> None:
        fig.tight_layout()
        fig.savefig(self.folder / f"{name}.png", dpi=90)
        self.plt.close(fig)
        self.sections.append(
            f'<section><h2>{html.escape(title)}</h2><img src="{name}.png" alt="{html.escape(title)}">'
            f"<p>{html.escape(caption)}</p></section>"
        )

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        def cell(value: object) -> str:
            return html.escape(f"{value:.3f}" if isinstance(value, float) else ("n/a" if value is None else str(value)))

        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        self.sections.append(f"<section><h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table></section>")

    def write(self, title: str, intro: str) -> Path:
        page = self.folder / "index.html"
        page.write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>"
            + html.escape(title)
            + "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body><h1>"
            + html.escape(title)
            + f"</h1><p>{html.escape(intro)}</p>"
            + "".join(self.sections)
            + "</body></html>"
        )
        return page


def _metric_series(lines: Sequence[Mapping[str, Any]], key: str) -> tuple[dict[str, list[tuple[int, float]]], list]:
    per_site: dict[str, list[tuple[int, float]]] = {}
    pooled: list[tuple[int, float]] = []
    for line in lines:
        evaluation = line.get("evaluation")
        if not evaluation or "evaluated_round" not in line:
            continue
        r = int(line["evaluated_round"])
        for site, m in evaluation["sites"].items():
            if m.get(key) is not None:
                per_site.setdefault(site, []).append((r, float(m[key])))
        if evaluation["pooled"].get(key) is not None:
            pooled.append((r, float(evaluation["pooled"][key])))
    return per_site, pooled


def write_job_report(
    job_out: Path,
    folder: Path,
    *,
    title: str = "radfed federated job",
    intensities: Sequence[SiteIntensities] = (),
    samples: Sequence[SampleSlice] = (),
    new_studies: tuple[Sequence[str], Sequence[Sequence[object]]] | None = None,
    base_model: Mapping[str, Any] | None = None,
) -> Path:
    """The report of one job folder (metrics.jsonl, model card, artifact) with optional extra figures: new
    studies' results against their truth (``new_studies``: header and rows) and the base model fine-tuned."""
    from radfed.federation.learning.evaluation import roc_points
    from radfed.federation.learning.subgroups import table_rows

    lines = [json.loads(x) for x in (job_out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rounds = [m for m in lines if "round" in m]
    final = next((m["evaluation"] for m in lines if m.get("stage") == "final" and m.get("evaluation")), None)
    report = ReportWriter(folder)
    plt = report.plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sites = sorted({s for m in rounds for s in m["sites"]})
    for site in sites:
        pts = [(m["round"], m["sites"][site]["train_loss"]) for m in rounds if site in m["sites"]]
        axes[0].plot(*zip(*pts, strict=True), marker="o", label=site)
    axes[0].set(title="training loss per site", xlabel="round", ylabel="loss")
    for ax, key in ((axes[1], "dice"), (axes[2], "auc")):
        per_site, pooled = _metric_series(lines, key)
        for site, pts in sorted(per_site.items()):
            ax.plot(*zip(*pts, strict=True), marker=".", alpha=0.6, label=site)
        if pooled:
            ax.plot(*zip(*pooled, strict=True), marker="o", color="black", linewidth=2, label="pooled")
        ax.set(title=f"held-out {key} of the global model", xlabel="after round", ylim=(0, 1.02))
    for ax in axes:
        ax.legend(fontsize=7)
    report.figure(
        "curves",
        "Training curves",
        fig,
        "Loss as each site trained; Dice and AUC of the global model on each site's held-out studies "
        "(evaluated by the site before the next round) and pooled over all sites.",
    )

    _, pooled_dice = _metric_series(lines, "dice")
    if pooled_dice:
        start = (
            f"fine-tuned from base model {base_model.get('key')} ({base_model.get('steps')} steps on public studies)"
            if base_model
            else "random initial weights"
        )
        report.table(
            f"Pooled held-out Dice of the global model by round (start: {start})",
            ["after round", "pooled Dice"],
            [[r, round(d, 3)] for r, d in pooled_dice],
        )
    if new_studies is not None:
        report.table(
            "New studies at hospital 1: radfed's stored SEG against the synthetic truth", new_studies[0], new_studies[1]
        )

    if final:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        names = sorted(final["sites"]) + ["pooled"]
        values = [final["sites"].get(n, final["pooled"]) if n != "pooled" else final["pooled"] for n in names]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [v.get("dice") or 0 for v in values], 0.4, label="Dice")
        ax.bar(x + 0.2, [v.get("auc") or 0 for v in values], 0.4, label="AUC")
        ax.set_xticks(x, names)
        ax.set(ylim=(0, 1.05), title="final model per site")
        ax.legend()
        report.figure("per_site", "Dice and AUC per site", fig, "Missing bars: undefined (no positive study).")
        report.table(
            "Final evaluation",
            ["site", "studies", "Dice", "lesion sensitivity", "AUC", "sensitivity", "specificity", "F1"],
            [
                [n, v.get("studies"), v.get("dice"), v.get("lesion_sensitivity"), v.get("auc")]
                + [v.get("sensitivity"), v.get("specificity"), v.get("f1")]
                for n, v in zip(names, values, strict=True)
            ]
            # sites under evaluation-min-studies sent no figures (from so few they would be those patients' own)
            + [[n, "withheld (< evaluation-min-studies)"] + [None] * 6 for n in final.get("withheld", [])],
        )
        if final.get("subgroups"):  # bias checks: only subgroups of >= min_cell studies left each site
            report.table(
                f"Bias checks: per subgroup of >= {final['subgroups']['min_cell']} held-out studies, pooled",
                *table_rows(final["subgroups"]),
            )
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        scores = next(m["evaluation"]["scores"] for m in lines if m.get("stage") == "final")
        for name, hist in sorted(scores.items()):
            fpr, tpr = roc_points(hist["positive"], hist["negative"])
            ax.plot(fpr, tpr, linewidth=2.5 if name == "pooled" else 1, label=name)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, final model")
        ax.legend(fontsize=7)
        report.figure("roc", "ROC curves", fig, "From the sites' binned study scores (no per-study value left a site).")

    if any("epsilon" in s for m in rounds for s in m["sites"].values()):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for site in sites:
            pts = [(m["round"], m["sites"][site]["epsilon"]) for m in rounds if "epsilon" in m["sites"].get(site, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=site)
        ax.set(title="differential privacy: epsilon spent", xlabel="round", ylabel="epsilon")
        ax.legend(fontsize=7)
        report.figure(
            "privacy", "DP budget spent per site", fig, "Each site's RDP accountant, persisted across rounds."
        )

    if intensities:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for item in intensities:
            axes[0].hist(item.before, bins=80, histtype="step", density=True, label=item.site)
            axes[1].hist(item.after, bins=80, histtype="step", density=True, label=item.site)
        axes[0].set(title="T2W before harmonisation (own percentile scaling)")
        axes[1].set(title="T2W after federated harmonisation")
        for ax in axes:
            ax.legend(fontsize=7)
        report.figure("harmonisation", "Site differences before and after harmonisation", fig)
        rows: list[list[object]] = []
        for item in intensities:
            for stage, voxels in (("before", item.before), ("after", item.after)):
                features = first_order_features(voxels)
                rows.append([item.site, stage, *features.values()])
        report.table(
            "First-order features (T2W foreground)", ["site", "stage", *first_order_features(np.ones(2))], rows
        )

    for index, sample in enumerate(samples):
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(sample.image, cmap="gray")
        if sample.outline.any():
            ax.contour(sample.outline.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=1.5)
        ax.set_axis_off()
        ax.set_title(sample.title, fontsize=9)
        report.figure(f"sample_{index}", sample.title, fig, sample.caption)

    card = job_out / "model-card.md"
    if card.is_file():
        report.sections.append(f"<section><h2>Model card</h2><pre>{html.escape(card.read_text())}</pre></section>")
    return report.write(title, "Generated by radfed from the job's metrics and the sites' results.")
