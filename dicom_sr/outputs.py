"""Build every result object for one study, check them, and hand them over for storage."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset

from radfed.dicom_sr.profile import OutputProfile
from radfed.dicom_sr.qa import encoded, verify_seg_geometry, verify_sr
from radfed.dicom_sr.seg import build_seg, result_key
from radfed.dicom_sr.sr import build_sr
from radfed.dicom_sr.uids import ResultKey
from radfed.inference.pipeline.findings import InferenceResult
from radfed.inference.timing import StageTimer


@dataclass(frozen=True, eq=False)
class ResultObjects:
    """The objects to store for one result, already re-read from their encoded bytes."""

    key: ResultKey
    seg: Dataset | None
    sr: Dataset
    key_images: tuple[Dataset, ...] = ()

    def datasets(self) -> Iterator[Dataset]:
        """Storage order: the SEG first, so the SR never references an object the PACS lacks."""
        if self.seg is not None:
            yield self.seg
        yield self.sr
        yield from self.key_images


def build_results(
    result: InferenceResult,
    profile: OutputProfile | None = None,
    *,
    predecessor: Dataset | None = None,
    timer: StageTimer | None = None,
) -> ResultObjects:
    """SEG (when there are lesions) and SR for ``result``; raises ResultQualityError if a check fails.

    Time goes to the ``encode`` and ``qa`` stages of ``timer``.
    """
    profile = profile or OutputProfile()
    timer = timer or StageTimer()
    stored_seg = None
    with timer.stage("encode"):
        seg = build_seg(result, profile)
        if seg is not None:
            stored_seg = encoded(seg)
    if stored_seg is not None:
        with timer.stage("qa"):
            verify_seg_geometry(stored_seg, result.lesion_labels, result.grid)
    with timer.stage("encode"):
        sr = encoded(build_sr(result, stored_seg, profile, predecessor))
    with timer.stage("qa"):
        verify_sr(sr, result, profile.sr_variant, stored_seg)
    key_images: tuple[Dataset, ...] = ()
    if profile.key_images and result.lesions:
        from radfed.dicom_sr.key_images import build_key_images

        with timer.stage("encode"):
            key_images = tuple(encoded(ds) for ds in build_key_images(result, profile))
    return ResultObjects(result_key(result), stored_seg, sr, key_images)
