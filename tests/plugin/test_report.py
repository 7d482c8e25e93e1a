"""The job report as people see it: written from real evaluation counts (a briefly trained model on the
synthetic sites' studies, evaluated by the federation's own code), rendered by headless Chromium (Debian
``chromium`` through Playwright), every plot loaded and not blank. Also the federated metric maths."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint, append_metrics, evaluation_line, model_card
from radfed.federation.lab.experiments import load_site_cohorts
from radfed.federation.learning.evaluation import EvaluationCounts, evaluate_model, histogram_auc
from radfed.federation.learning.training import TrainingSettings, new_model, train_local
from radfed.inference.model.taskspec import load_task_spec
from radfed.plugin.tools.report import SampleSlice, SiteIntensities, write_job_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, installed by make install (never skipped)


def test_histogram_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    positive, negative = rng.beta(4, 2, 40), rng.beta(2, 4, 60)
    bins = np.linspace(0, 1, 51)
    auc = histogram_auc(np.histogram(positive, bins)[0].tolist(), np.histogram(negative, bins)[0].tolist())
    exact = float(np.mean([[float(p > n) + 0.5 * float(p == n) for n in negative] for p in positive]))
    assert auc is not None and abs(auc - exact) < 0.03  # binning costs at most a little
    assert histogram_auc([1, 0], [0, 0]) is None  # undefined without negatives


def test_counts_add_up_across_sites() -> None:
    a = EvaluationCounts(studies=2, dice_sum=1.2, dice_studies=2, lesions_total=3, lesions_found=2, true_positive=1)
    b = EvaluationCounts(studies=1, dice_sum=0.3, dice_studies=1, lesions_total=1, lesions_found=1, true_negative=1)
    pooled = (a + b).summary()
    assert pooled["studies"] == 3 and pooled["dice"] == pytest.approx(0.5)
    assert pooled["lesion_sensitivity"] == pytest.approx(0.75)
    assert EvaluationCounts.from_metrics(a.as_metrics()) == a


def _job_folder(tmp_path: Path, synth_root: Path) -> Path:
    """Two 'rounds' of real training and evaluation per site, written as the coordinator writes them."""
    out = tmp_path / "job"
    out.mkdir()
    state = CoordinatorCheckpoint()
    cohorts = load_site_cohorts({site.name: site for site in sorted(synth_root.glob("site-*"))}, load_task_spec())
    spec = next(iter(cohorts.values())).spec  # one plan for every site, as the coordinator makes it
    model = new_model(spec)
    for round_number in (1, 2):
        site_metrics = {}
        for name, cohort in cohorts.items():
            counts = evaluate_model(model, cohort.samples, spec)
            log = train_local(model, cohort.samples, spec, TrainingSettings.from_spec(spec, steps=2, seed=round_number))
            site_metrics[name] = {**counts.as_metrics(), "train_loss": log.losses[-1], "epsilon": 1.5 * round_number}
            state.studies_per_site[name] = len(cohort.samples)
        scalars = {s: {k: v for k, v in m.items() if not isinstance(v, list)} for s, m in site_metrics.items()}
        line = {"round": round_number, "sites": scalars, "flagged": [], "aggregated": list(cohorts)}
        line |= {"evaluation": evaluation_line(site_metrics), "evaluated_round": round_number - 1}
        append_metrics(out, line)
    final = evaluation_line({n: evaluate_model(model, c.samples, spec).as_metrics() for n, c in cohorts.items()})
    append_metrics(out, {"stage": "final", "evaluated_round": 2, "evaluation": final})
    card = model_card(job="t", model_key="m:1", rounds=2, aggregation="fedavg", state=state, epsilon_budget=3.0,
                      delta=1e-5, final_evaluation=final)  # fmt: skip
    (out / "model-card.md").write_text(card)
    return out


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path, synth_root: Path) -> None:
    from matplotlib import image as mpimg
    from playwright.sync_api import sync_playwright

    job = _job_folder(tmp_path, synth_root)
    rng = np.random.default_rng(1)
    page_path = write_job_report(
        job,
        tmp_path / "report",
        intensities=[
            SiteIntensities(
                f"site-{i}", rng.normal(i, 1, 5000).astype(np.float32), rng.normal(0, 1, 5000).astype(np.float32)
            )
            for i in (1, 2)
        ],
        samples=[SampleSlice("a slice", rng.random((64, 64)), np.pad(np.ones((8, 8), bool), 28), "outline")],
    )
    images = sorted(p.name for p in page_path.parent.glob("*.png"))
    assert images == ["curves.png", "harmonisation.png", "per_site.png", "privacy.png", "roc.png", "sample_0.png"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            rendered = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth, e.naturalHeight])"
            )
            shots = [page.locator(f"img[src='{name}']").screenshot() for name in images]
            text = page.inner_text("body")
        finally:
            browser.close()
    assert not errors
    assert sorted(r[0] for r in rendered) == images
    assert all(complete and width > 100 and height > 100 for _, complete, width, height in rendered), rendered
    for name, shot in zip(images, shots, strict=True):
        pixels = mpimg.imread(io.BytesIO(shot), format="png")
        assert pixels.std() > 0.02, f"{name} looks blank"  # drawn, not an empty canvas
    assert "Final evaluation" in text and "Model card" in text and "site-1" in text
