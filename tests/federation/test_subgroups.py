"""Bias checks (issue 20 item 5): subgroups from DICOM headers, the minimum cell at the site (with the cells held
back so that site totals cannot isolate a small one), the allow-list's check of every cell, and the coordinator's
pooled table with intervals and gaps."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy import stats

from radfed.federation.job.run_config import RunConfig, RunConfigError
from radfed.federation.learning.evaluation import EvaluationCounts, histogram_auc
from radfed.federation.learning.messages import SCORE_BINS, MetricLeakError, allowed_metrics
from radfed.federation.learning.subgroup_cells import (
    SUPPRESSED,
    Attribute,
    StudySubgroups,
    cell_name,
    subgroups_from_header,
)
from radfed.federation.learning.subgroups import (
    auc_interval,
    card_section,
    mean_interval,
    released,
    study_subgroups,
    subgroup_metrics,
    subgroup_table,
)


def header(**tags: object) -> Dataset:
    ds = Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_header_values_map_onto_the_closed_vocabulary() -> None:
    found = subgroups_from_header(
        header(Manufacturer="GE MEDICAL SYSTEMS", MagneticFieldStrength="15000", PatientAge="091Y", PatientSex="F")
    )
    assert found == StudySubgroups(vendor="ge", field_strength="1.5T", age="90+", sex="F")
    dated = header(Manufacturer="Toshiba", MagneticFieldStrength="3", PatientBirthDate="19600301", StudyDate="20250228")
    assert subgroups_from_header(dated) == StudySubgroups(vendor="canon", field_strength="3T", age="60-69")
    odd = header(Manufacturer="Hospital Physics Lab of St. Elsewhere", MagneticFieldStrength="0.55", PatientSex="X")
    assert subgroups_from_header(odd) == StudySubgroups(vendor="other", field_strength="other", sex="unknown")
    assert subgroups_from_header(None) == StudySubgroups()  # every attribute unknown
    assert subgroups_from_header(header(PatientAge="006M")).age == "0-9"


def test_a_synthetic_folder_s_studies_get_their_site_s_vendor_and_field_strength(synth_root: Path) -> None:
    from radfed.federation.learning.cohort import folder_studies, study_key

    studies = [s for s, _, _ in folder_studies(synth_root) if s is not None]
    keys = {study_key(s.study_instance_uid) for s in studies}
    found = study_subgroups([str(synth_root)], keys)
    assert set(found) == keys and len(keys) == 6
    assert {(g.vendor, g.field_strength) for g in found.values()} == {("siemens", "3T"), ("ge", "1.5T")}
    assert {g.sex for g in found.values()} == {"M"}
    assert all(g.age != "unknown" for g in found.values())  # from PatientBirthDate and StudyDate
    only = next(iter(keys))
    assert set(study_subgroups([str(synth_root)], {only})) == {only}  # only the studies asked for


def test_released_holds_back_more_cells_until_the_rest_is_zero_or_k() -> None:
    # c alone (1 study) would be had as the site total minus a and b: b (the smallest released) goes too
    assert released({"a": (10,), "b": (8,), "c": (1,)}, ["a", "b", "c"], 5) == {"a"}
    assert released({"a": (10,), "b": (8,), "c": (5,)}, ["a", "b", "c"], 5) == {"a", "b", "c"}
    assert released({"a": (10,), "b": (8,), "c": (0,)}, ["a", "b", "c"], 5) == {"a", "b"}
    assert released({"a": (4,), "b": (3,)}, ["a", "b"], 5) == set()
    # two counts (positives, negatives): each held-back total must be 0 or >= k
    assert released({"a": (6, 6), "b": (6, 5), "c": (6, 1)}, ["a", "b", "c"], 5) == {"a"}


def study(dice: float | None, label: int | None, score_bin: int = 40) -> EvaluationCounts:
    counts = EvaluationCounts(studies=1)
    if dice is not None:
        counts.dice_sum, counts.dice_studies = dice, 1
    if label == 1:
        counts.positive_scores[score_bin] += 1
    elif label == 0:
        counts.negative_scores[score_bin] += 1
    return counts


def site_studies() -> list[tuple[EvaluationCounts, StudySubgroups]]:
    """7 Siemens studies (6 with a lesion), 5 GE (3 with a lesion), 1 Philips."""
    siemens = StudySubgroups("siemens", "3T", "60-69", "M")
    ge = StudySubgroups("ge", "1.5T", "70-79", "M")
    philips = StudySubgroups("philips", "3T", "60-69", "M")
    rows = [(study(0.8, 1, 50), siemens) for _ in range(3)] + [(study(0.6, 1, 45), siemens) for _ in range(3)]
    rows += [(study(None, 0, 20), siemens)]
    rows += [(study(0.5, 1, 40), ge) for _ in range(3)] + [(study(None, 0, 30), ge) for _ in range(2)]
    return [*rows, (study(0.9, 1, 60), philips)]


def test_a_cell_below_k_never_leaves_the_site_and_every_cell_passes_the_allow_list() -> None:
    metrics = subgroup_metrics(site_studies(), 5)
    assert allowed_metrics(metrics) == metrics  # what the ClientApp would send
    # philips (1 study) is below k; then 1 held back of 13 would be the total minus the rest: GE (5) goes too
    names = {"vendor.siemens", "field-strength.3T", "field-strength.1.5T", "age.60-69", "age.70-79", "sex.M"}
    assert set(metrics) == {f"subgroup.{n}" for n in names} | {SUPPRESSED}
    assert metrics[SUPPRESSED] == [6.0, 0.0, 0.0, 0.0]  # vendor, field strength, age, sex
    # Siemens' 6 lesion studies are >= k, but the other 4 would then be the site's Dice total minus Siemens'
    assert metrics[cell_name(Attribute.VENDOR, "siemens")][:5] == [5.0, 7.0, 0.0, 0.0, 0.0]
    everyone = metrics[cell_name(Attribute.SEX, "M")]
    assert everyone[:5] == [5.0, 13.0, 10.0, pytest.approx(6.6), pytest.approx(4.56)]
    assert sum(everyone[5:]) == 0  # 10 positives but 3 negatives: no histogram, no AUC
    assert metrics[cell_name(Attribute.FIELD_STRENGTH, "3T")][1:3] == [8.0, 0.0]  # 1.5T has 3 lesion studies


def test_the_allow_list_refuses_small_or_unknown_cells() -> None:
    good = subgroup_metrics(site_studies(), 5)[cell_name(Attribute.SEX, "M")]
    small = [5.0, 4.0, *good[2:]]
    with pytest.raises(MetricLeakError, match="below the minimum cell"):
        allowed_metrics({cell_name(Attribute.SEX, "M"): small})
    with pytest.raises(MetricLeakError, match="minimum cell"):
        allowed_metrics({cell_name(Attribute.SEX, "M"): [1.0, *good[1:]]})  # k = 1: one study's own figures
    with pytest.raises(MetricLeakError, match="closed vocabulary"):
        allowed_metrics({"subgroup.vendor.St-Elsewhere-MRI-2": good})
    with pytest.raises(MetricLeakError, match="Dice over 2"):
        allowed_metrics({cell_name(Attribute.SEX, "M"): [*good[:2], 2.0, 1.0, 0.5, *good[5:]]})
    one_positive = [*good[:5], *([0.0] * (2 * SCORE_BINS))]
    one_positive[5 + 3], one_positive[5 + SCORE_BINS + 2] = 1.0, 9.0
    with pytest.raises(MetricLeakError, match="each label"):
        allowed_metrics({cell_name(Attribute.SEX, "M"): one_positive})


def test_the_coordinator_pools_cells_exactly_with_intervals_and_the_largest_gap() -> None:
    a = subgroup_metrics(site_studies()[:-1], 3)  # without the Philips study
    ge = StudySubgroups(vendor="ge")
    b = subgroup_metrics([(study(0.2, 1, 30), ge) for _ in range(4)] + [(study(None, 0, 35), ge)] * 3, 3)
    c = subgroup_metrics(site_studies(), 3)  # its Philips study and (to hide it) its GE cell stay at the site
    table = subgroup_table({"hospital-1": a, "hospital-2": b, "hospital-3": c}, 3)
    assert table is not None
    vendor = table["attributes"]["vendor"]
    assert set(vendor["cells"]) == {"siemens", "ge"} and vendor["held_back_studies"] == 6
    pooled = vendor["cells"]["ge"]
    assert (pooled["studies"], pooled["dice_studies"]) == (12, 7)
    assert pooled["dice"] == pytest.approx((3 * 0.5 + 4 * 0.2) / 7)
    assert pooled["dice_ci"][0] < pooled["dice"] < pooled["dice_ci"][1]
    # only hospital-2's histograms left (hospital-1's GE cell has 2 negatives): every positive below every negative
    assert (pooled["positives"], pooled["negatives"], pooled["auc"]) == (4, 3, 0.0)
    siemens = vendor["cells"]["siemens"]
    assert siemens["studies"] == 14 and siemens["dice"] == pytest.approx(0.7)
    gap = vendor["gaps"]["dice"]
    assert (gap["high"], gap["low"]) == ("siemens", "ge")
    assert gap["gap"] == pytest.approx(siemens["dice"] - pooled["dice"])
    assert gap["ci"][0] < gap["gap"] < gap["ci"][1]
    assert table["sites"]["hospital-2"]["vendor.ge"]["studies"] == 7
    assert "vendor.ge" not in table["sites"]["hospital-3"]
    card = card_section(table, 3)
    low, high = pooled["dice_ci"]
    assert f"| vendor | ge | 12 | {pooled['dice']:.3f} ({low:.3f}-{high:.3f}) | 0.000 (0.000-0.000) |" in card


def test_a_site_that_sends_no_cell_gives_no_table() -> None:
    few = subgroup_metrics(site_studies()[:3], 5)
    assert set(few) == {SUPPRESSED} and few[SUPPRESSED] == [3.0, 3.0, 3.0, 3.0]
    assert subgroup_table({"hospital-1": few}, 5) is None
    assert "No subgroup of at least 5" in card_section(None, 5)


def test_dice_interval_is_the_t_interval_of_the_values() -> None:
    values = np.array([0.2, 0.5, 0.55, 0.7, 0.9, 0.85])
    mean, ci, _ = mean_interval(float(values.sum()), float((values**2).sum()), len(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean()) and ci == pytest.approx([low, high])


def test_auc_interval_is_delong_s_on_the_binned_scores() -> None:
    rng = np.random.default_rng(3)
    pos_bins, neg_bins = rng.integers(20, 50, size=15), rng.integers(10, 40, size=12)
    positive, negative = np.bincount(pos_bins, minlength=SCORE_BINS), np.bincount(neg_bins, minlength=SCORE_BINS)
    auc, ci, se = auc_interval(positive.tolist(), negative.tolist())
    # DeLong from its definition, study by study: psi = 1 above, 1/2 tied, 0 below
    psi = (pos_bins[:, None] > neg_bins[None, :]) + 0.5 * (pos_bins[:, None] == neg_bins[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    variance = v10.var(ddof=1) / len(pos_bins) + v01.var(ddof=1) / len(neg_bins)
    assert auc == pytest.approx(psi.mean()) == pytest.approx(histogram_auc(positive, negative))
    assert se == pytest.approx(np.sqrt(variance))
    assert ci == pytest.approx([psi.mean() - 1.959964 * se, min(1.0, psi.mean() + 1.959964 * se)])


def test_minimum_counts_below_two_are_refused() -> None:
    assert RunConfig().bias_min_cell == 5
    with pytest.raises(RunConfigError, match="bias-min-cell"):
        RunConfig.from_run_config({"bias-min-cell": 1})
    # the output calibration's sums likewise: never one study's own figures
    assert RunConfig().calibration_min_studies == 2
    with pytest.raises(RunConfigError, match="calibration-min-studies"):
        RunConfig.from_run_config({"calibration-min-studies": 1})
    # and the evaluation's figures
    assert RunConfig().evaluation_min_studies == 2
    with pytest.raises(RunConfigError, match="evaluation-min-studies"):
        RunConfig.from_run_config({"evaluation-min-studies": 1})


def test_a_site_under_evaluation_min_studies_sends_no_figures_and_is_named(tmp_path: Path) -> None:
    """One held-out study's counts would be that patient's own (its tumour's volume, its lesions, its score):
    the site sends only the flag; the coordinator pools the others and the model card names the site."""
    from radfed.federation.coordinator.checkpoint import (
        CoordinatorCheckpoint,
        append_metrics,
        evaluation_line,
        model_card,
    )
    from radfed.plugin.tools.report import write_job_report

    rows = site_studies()
    one, two = rows[0][0], rows[0][0] + rows[1][0]
    assert one.studies == 1 and two.studies == 2
    assert one.shareable(2) == {"evaluation_withheld": 1} == allowed_metrics(one.shareable(2))
    assert two.shareable(2) == two.as_metrics() and two.shareable(3) == {"evaluation_withheld": 1}
    assert EvaluationCounts().shareable(2) == EvaluationCounts().as_metrics()  # nothing held out: zeros
    line = evaluation_line({"hospital-1": two.shareable(2), "hospital-2": one.shareable(2)})
    assert line is not None and line["withheld"] == ["hospital-2"] and set(line["sites"]) == {"hospital-1"}
    assert line["pooled"] == two.summary()
    card = model_card(
        job="j", model_key="m:1", rounds=3, aggregation="fedavg", state=CoordinatorCheckpoint(),
        epsilon_budget=0, delta=1e-5, final_evaluation=line,
    )  # fmt: skip
    assert "hospital-2 held out fewer studies than `evaluation-min-studies` and sent no figures" in card
    append_metrics(tmp_path, {"stage": "final", "evaluated_round": 3, "evaluation": line})
    page = write_job_report(tmp_path, tmp_path / "report").read_text()
    assert "<td>hospital-2</td><td>withheld (&lt; evaluation-min-studies)</td>" in page
    alone = evaluation_line({"hospital-2": one.shareable(2)})
    assert alone is not None and alone["sites"] == {} and alone["pooled"]["dice"] is None


def test_age_band_from_dates_is_whole_years() -> None:
    birth = dt.date(1955, 6, 1)
    before = header(PatientBirthDate=birth.strftime("%Y%m%d"), StudyDate="20250530")
    after = header(PatientBirthDate=birth.strftime("%Y%m%d"), StudyDate="20250602")
    assert (subgroups_from_header(before).age, subgroups_from_header(after).age) == ("60-69", "70-79")


def test_the_job_report_shows_the_pooled_subgroups(tmp_path: Path) -> None:
    from radfed.federation.coordinator.checkpoint import append_metrics, evaluation_line
    from radfed.plugin.tools.report import write_job_report

    rows = site_studies()
    total = sum((counts for counts, _ in rows), EvaluationCounts())
    site_metrics = {"hospital-1": {**total.as_metrics(), **subgroup_metrics(rows, 5)}}
    final = evaluation_line(site_metrics)
    assert final is not None
    final["subgroups"] = subgroup_table(site_metrics, 5)
    append_metrics(tmp_path, {"stage": "final", "evaluated_round": 1, "evaluation": final})
    page = write_job_report(tmp_path, tmp_path / "report").read_text()
    assert "Bias checks: per subgroup of &gt;= 5 held-out studies, pooled" in page
    everyone = final["subgroups"]["attributes"]["sex"]["cells"]["M"]
    assert f"<td>sex</td><td>M</td><td>13</td><td>{everyone['dice']:.3f} (" in page
    assert "<td>vendor</td><td>philips</td>" not in page  # 1 study: it never left the site
