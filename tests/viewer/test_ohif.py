"""radfed's SEG and SR in the real OHIF v3 viewer (npm @ohif/app 3.13.2, served by ``radfed viewer``'s
server with its same-origin proxy to a real Orthanc), in headless Debian Chromium.

For every lesion: the labelmap OHIF built holds exactly radfed's voxels, in radfed's segment colour, and
the overlay OHIF draws lands on the true lesion (Dice >= 0.85 between the pixels the overlay changed and the
lesion projected with the viewport's own transform, on the lesion's largest slice); the SR is drawn as one
outline per lesion carrying volume, diameters and probability; no viewport crashed. Axial and oblique
studies, 0, 1 and 3 lesions. Negative controls (a shifted SEG, a flipped SEG, an SR whose volumetric group
has its own Tracking UID) must be caught. Screenshots go to artifacts/viewer/ for people to look at."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile, SrVariant
from radfed.dicom_sr.seg import lesion_colour
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline.findings import InferenceResult
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.plugin.tools.viewer import OrthancTarget, ViewerServer, default_dist
from tests.dicom_sr.conftest import result_from_study
from tests.viewer.ohif_driver import ViewerPage, chromium_page, dice, overlay_mask, projected_mask

pytestmark = [pytest.mark.orthanc, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "viewer"
MIN_OVERLAP = 0.85


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrthancProcess, ViewerServer]]:
    from radfed.inference.testing.orthanc_server import start_orthanc

    orthanc = start_orthanc(tmp_path_factory.mktemp("ohif-orthanc"))
    viewer = ViewerServer(
        default_dist(ROOT), OrthancTarget(orthanc.url, orthanc.options.username, orthanc.options.password)
    ).start()
    try:
        yield orthanc, viewer
    finally:
        viewer.stop()
        orthanc.stop()


_NUMBERS = iter(range(60, 200))


def store(orthanc: OrthancProcess, n_lesions: int, oblique: bool, alter: Callable[..., object] | None = None,
          profile: OutputProfile | None = None) -> tuple[SyntheticStudy, InferenceResult]:  # fmt: skip
    """A new synthetic study in Orthanc with radfed's SEG + SR (optionally from an altered result)."""
    study = render_study(site_profile(2, small=True), next(_NUMBERS), 31, n_lesions=n_lesions, oblique=oblique)
    truth = result_from_study(study)
    written = truth if alter is None else alter(truth)
    assert isinstance(written, InferenceResult)
    with OrthancClient(orthanc.endpoint) as client:
        for sequence in Sequence:
            for ds in study.series[sequence]:
                client.upload_dataset(ds)
        for ds in build_results(written, profile).datasets():
            client.upload_dataset(ds)
    return study, truth


def stack_index(viewer: ViewerPage, truth: InferenceResult, slice_index: int) -> int:
    """Where our slice sits in OHIF's stack (OHIF orders the images itself)."""
    uid = truth.grid.slice_sources[slice_index][0]
    return next(i for i, image_id in enumerate(viewer.image_ids()) if f"/instances/{uid}/" in image_id)


def overlay_overlap(viewer: ViewerPage, truth: InferenceResult, lesion: int, name: str) -> float:
    """Dice between the overlay OHIF draws and the true lesion, on the lesion's largest slice."""
    mask = truth.lesion_labels == lesion
    largest = int(np.argmax(mask.sum(axis=(1, 2))))
    viewer.go_to_slice(stack_index(viewer, truth, largest))
    drawn = viewer.settled_canvas_pixels()
    viewer.show_segmentation(False)
    bare = viewer.settled_canvas_pixels()
    viewer.show_segmentation(True)
    assert viewer.current_slice() == stack_index(viewer, truth, largest)  # nothing moved between the shots
    overlay = overlay_mask(drawn, bare)
    # on this slice, every drawn pixel should be some lesion; this lesion's pixels are the target
    expected = projected_mask(mask.astype(np.uint8), truth.grid.affine, viewer.canvas_to_world(), overlay.shape[:2])
    others = projected_mask(truth.lesion_labels, truth.grid.affine, viewer.canvas_to_world(), overlay.shape[:2])
    viewer.screenshot(ARTIFACTS / f"{name}-lesion{lesion}.png")
    nearby = overlay & ~(others & ~expected)  # leave out other lesions' overlay on the same slice
    score = dice(nearby, expected)
    with (ARTIFACTS / "overlap.tsv").open("a") as log:
        log.write(f"{name}\tlesion {lesion}\t{score:.3f}\n")
    return score


CASES = [(1, False), (3, False), (1, True), (3, True)]


@pytest.mark.parametrize(
    ("n_lesions", "oblique"), CASES, ids=[f"{n}-lesion-{'oblique' if o else 'axial'}" for n, o in CASES]
)
def test_seg_and_sr_drawn_on_the_lesions(
    pacs: tuple[OrthancProcess, ViewerServer], n_lesions: int, oblique: bool
) -> None:
    orthanc, server = pacs
    study, truth = store(orthanc, n_lesions, oblique)
    name = f"{n_lesions}-lesion-{'oblique' if oblique else 'axial'}"
    with chromium_page() as viewer:
        viewer.open_study(server.study_url(study.identity.study_instance_uid))
        viewer.open_series("SEG")
        counts = viewer.labelmap_voxels()
        assert counts == {n: int((truth.lesion_labels == n).sum()) for n in range(1, n_lesions + 1)}
        for lesion in range(1, n_lesions + 1):
            assert all(
                abs(a - b) <= 2 for a, b in zip(viewer.segment_colour(lesion), lesion_colour(lesion), strict=True)
            )
            overlap = overlay_overlap(viewer, truth, lesion, name)
            assert overlap >= MIN_OVERLAP, f"lesion {lesion}: overlay/lesion Dice {overlap:.2f}"
        viewer.open_series("SR")
        annotations = viewer.sr_annotations()
        viewer.screenshot(ARTIFACTS / f"{name}-sr.png")
        assert len(annotations) == n_lesions, annotations
        for annotation in annotations:
            labels = dict(annotation["labels"])
            assert {"Volume", "Long axis", "Short axis"} <= set(labels), labels
            assert any("Probability" in key for key in labels), labels
            assert annotation["points"] >= 4  # an outline, not a point
        drawn = " ".join(viewer.drawn_text())
        assert "mm" in drawn, drawn  # the SR's labels are on the image
        assert viewer.viewer_errors() == []


# OHIF 3.13.2's SR viewport reads measurements[0] unconditionally (extensions/cornerstone-dicom-sr,
# _getViewportReferencedDisplaySetData): an SR without any measurement group, which is what "no lesion found"
# is, blanks the SR viewport. radfed cannot put a geometric group in it without inventing a region.
OHIF_EMPTY_SR_CRASH = "Cannot destructure property 'displaySetInstanceUID' of 'measurement'"


def test_no_lesion_sr_is_listed_and_says_so(pacs: tuple[OrthancProcess, ViewerServer]) -> None:
    orthanc, server = pacs
    study, _ = store(orthanc, 0, False)
    with chromium_page() as viewer:
        viewer.open_study(server.study_url(study.identity.study_instance_uid))
        modalities = sorted(d["modality"] for d in viewer.display_sets())
        assert "SEG" not in modalities and "SR" in modalities
        viewer.open_series("SR")
        viewer.screenshot(ARTIFACTS / "0-lesion-sr.png")
        text = viewer.page.evaluate(
            """() => { const sr = window.services.displaySetService.getActiveDisplaySets()
                         .find(d => d.Modality === 'SR');
                       return JSON.stringify(sr.instance || sr.instances[0]); }"""
        )
        assert "No abnormality" in text  # what OHIF loaded carries the statement
        # the only error is OHIF's own empty-SR crash (any other one fails)
        assert all(OHIF_EMPTY_SR_CRASH in error for error in viewer.viewer_errors()), viewer.viewer_errors()


def _shift(result: InferenceResult) -> InferenceResult:
    return replace(result, lesion_labels=np.roll(result.lesion_labels, 3, axis=2))


def _flip(result: InferenceResult) -> InferenceResult:
    return replace(result, lesion_labels=np.ascontiguousarray(result.lesion_labels[:, :, ::-1]))


@pytest.mark.parametrize("alter", [_shift, _flip], ids=["shifted-3-voxels", "flipped"])
def test_misplaced_seg_is_caught(pacs: tuple[OrthancProcess, ViewerServer], alter: Callable[..., object]) -> None:
    orthanc, server = pacs
    study, truth = store(orthanc, 1, False, alter=alter)
    with chromium_page() as viewer:
        viewer.open_study(server.study_url(study.identity.study_instance_uid))
        viewer.open_series("SEG")
        assert viewer.labelmap_voxels() == {1: int((truth.lesion_labels == 1).sum())}  # counts cannot tell
        overlap = overlay_overlap(viewer, truth, 1, f"control-{alter.__name__.strip('_')}")
        assert overlap < MIN_OVERLAP, f"a misplaced SEG passed: Dice {overlap:.2f}"


def test_volumetric_group_with_its_own_tracking_uid_is_caught(pacs: tuple[OrthancProcess, ViewerServer]) -> None:
    orthanc, server = pacs
    study, _ = store(orthanc, 1, False, profile=OutputProfile(sr_variant=SrVariant.VOLUMETRIC_ONLY))
    with chromium_page() as viewer:
        viewer.open_study(server.study_url(study.identity.study_instance_uid))
        viewer.open_series("SR")
        viewer.screenshot(ARTIFACTS / "control-volumetric-only-sr.png")
        assert any("Error Boundary" in message for message in viewer.viewer_errors())
