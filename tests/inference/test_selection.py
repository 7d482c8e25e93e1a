"""Series selection by the spec's rules, with a reason for every series."""

from __future__ import annotations

import dataclasses

import pytest

from radfed.inference.dicom.selection import NoMatchingSeriesError, SeriesInfo, obliquity_deg, select_series
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import render_study


def _infos(study: object) -> list[SeriesInfo]:
    infos = []
    for sequence in Sequence:
        datasets = study.series[sequence]  # type: ignore[attr-defined]
        infos.append(SeriesInfo.from_header(datasets[0], len(datasets), sequence.value))
    seg = study.reference_seg  # type: ignore[attr-defined]
    infos.append(SeriesInfo.from_header(seg, 1, "seg"))
    return infos


@pytest.mark.parametrize("site", [1, 2, 3])
def test_each_vendor_naming_is_recognised(site: int) -> None:
    study = render_study(site_profile(site, small=True), 1, 0)
    selection = select_series(load_task_spec(), _infos(study))
    assert {name: info.handle for name, info in selection.chosen.items()} == {"t2w": "t2w", "adc": "adc", "dwi": "dwi"}
    reasons = {d.series_description: d for d in selection.decisions}
    seg = next(d for d in selection.decisions if d.channel is None)
    assert any("SEG object" in reason for reason in seg.reasons)
    assert all(d.reasons for d in reasons.values())


def test_missing_dwi_names_the_rule_and_every_series() -> None:
    study = render_study(site_profile(1, small=True), 1, 0)
    infos = [i for i in _infos(study) if i.handle != "dwi"]
    with pytest.raises(NoMatchingSeriesError, match="no series matched rule dwi") as info:
        select_series(load_task_spec(), infos)
    assert "t2_tse_tra" in str(info.value) and "SEG object" in str(info.value)


def test_job_reasons_carry_series_descriptions_as_printable_ascii_only() -> None:
    """Reasons are shown in Orthanc Explorer: free text from the scanner is reduced, never copied raw."""
    study = render_study(site_profile(1, small=True), 1, 0)
    infos = _infos(study)
    noisy = infos[0].series_description + " \x00\x1b[31m caf\u00e9 " + "x" * 200
    infos[0] = dataclasses.replace(infos[0], series_description=noisy)
    infos[-1] = dataclasses.replace(infos[-1], series_description="")
    lines = select_series(load_task_spec(), infos).describe()
    text = "\n".join(lines)
    assert "\x00" not in text and "\x1b" not in text and "\u00e9" not in text and "x" * 100 not in text
    assert any("??[31m caf? xxx" in line and "...'" in line for line in lines), lines
    assert any(line.startswith("series ") for line in lines)  # no description: the UID's short hash


def test_reacquisition_wins() -> None:
    study = render_study(site_profile(1, small=True), 1, 0)
    infos = _infos(study)
    t2 = next(i for i in infos if i.handle == "t2w")
    repeat = dataclasses.replace(
        t2, series_instance_uid="9.9", series_number=(t2.series_number or 0) + 100, handle="repeat"
    )
    selection = select_series(load_task_spec(), [*infos, repeat])
    assert selection.chosen["t2w"].handle == "repeat"


def test_sagittal_and_wrong_b_value_are_rejected_with_reasons() -> None:
    study = render_study(site_profile(1, small=True), 1, 0)
    infos = _infos(study)
    dwi = next(i for i in infos if i.handle == "dwi")
    low_b = dataclasses.replace(dwi, series_instance_uid="1.1", b_value=50.0, handle="b50", series_number=99)
    t2 = next(i for i in infos if i.handle == "t2w")
    sagittal = dataclasses.replace(
        t2, series_instance_uid="1.2", orientation=(0, 1, 0, 0, 0, -1), handle="sag", series_number=98
    )
    selection = select_series(load_task_spec(), [*infos, low_b, sagittal])
    assert selection.chosen["dwi"].handle == "dwi" and selection.chosen["t2w"].handle == "t2w"
    text = "\n".join(selection.describe())
    assert "b-value 50 below 800" in text
    assert "90 deg from axial" in text


def test_non_image_instances_are_noted_and_a_series_without_images_is_rejected() -> None:
    infos = _infos(render_study(site_profile(1, small=True), 1, 0))
    t2 = next(i for i in infos if i.handle == "t2w")
    raw = ("Raw Data Storage object",)
    with_raw = dataclasses.replace(t2, non_image_instances=raw)
    raw_only = dataclasses.replace(
        t2, series_instance_uid="7.7", handle="raw", series_number=999, slices=0, non_image_instances=raw * 2
    )
    selection = select_series(load_task_spec(), [with_raw if i is t2 else i for i in infos] + [raw_only])
    assert selection.chosen["t2w"].handle == "t2w"
    reasons = {d.series_instance_uid: d.reasons for d in selection.decisions}
    assert "instances without an image skipped: Raw Data Storage object" in reasons[t2.series_instance_uid]
    assert any("no image among its instances (Raw Data Storage object (x2))" in r for r in reasons["7.7"])


def test_second_spec_selects_its_own_channels() -> None:
    study = render_study(site_profile(2, small=True), 1, 0)
    selection = select_series(load_task_spec("prostate_bpmri_highgrade"), _infos(study))
    assert set(selection.chosen) == {"adc", "t2"}
    assert selection.chosen["t2"].handle == "t2w"


def test_obliquity() -> None:
    assert obliquity_deg([1, 0, 0, 0, 1, 0]) == pytest.approx(0.0)
    assert obliquity_deg([1, 0, 0, 0, 0, -1]) == pytest.approx(90.0)
