"""TID 1500 Measurement Report as a Comprehensive 3D SR (PS3.16 TID 1500, 1410, 1411, 1501).

Per lesion, in the default ``viewer`` variant, two groups share the lesion's Tracking UID: a volumetric
group (TID 1411) referencing its SEG segment with volume, probability and mean ADC, and a planar group
(TID 1410) with the outline (SCOORD POLYLINE) on the key slice and the long and short axis. OHIF merges
them into one labelled outline; a volumetric group under its own Tracking UID would crash OHIF 3.13's
SR viewport (DICOM_OUTPUTS.md). A study-level group (TID 1501) carries the probability (NUM) and the
category (CODE), and says "no abnormality" when nothing was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from radfed.dicom_sr import codes, marking
from radfed.dicom_sr.profile import OutputProfile, SrVariant, StudyFindingPlacement
from radfed.dicom_sr.seg import concept, ordered_sources, result_key
from radfed.dicom_sr.uids import ResultKey, device_uid
from radfed.inference.pipeline.findings import InferenceResult, LesionFinding


def _algorithm(result: InferenceResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=result.model.name[:64], version=result.model.version[:64], family=codes.ARTIFICIAL_INTELLIGENCE
    )


def _observation_context(result: InferenceResult) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(result.model.name, result.model.version),
        name=result.model.name[:64],
        manufacturer_name=result.model.manufacturer[:64],
        model_name=f"{result.model.name} {result.model.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _finding_sites(result: InferenceResult) -> list[hd.sr.FindingSite] | None:
    site = result.codes.finding_site
    return [hd.sr.FindingSite(anatomic_location=concept(site))] if site else None


def _probability(result: InferenceResult, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=concept(result.codes.probability_concept), value=round(100.0 * value, 2), unit=codes.PERCENT
    )


@dataclass(frozen=True)
class _Sources:
    """Looked up once per report, not once per lesion."""

    by_uid: dict[str, Dataset]
    series_instance_uid: str

    @classmethod
    def of(cls, result: InferenceResult) -> _Sources:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in result.source_datasets}
        return cls(by_uid, str(ordered_sources(result)[0][0].SeriesInstanceUID))


def _key_slice_image(result: InferenceResult, lesion: LesionFinding, sources: _Sources) -> hd.sr.SourceImageForRegion:
    uid, frame = result.grid.slice_sources[lesion.measurements.key_slice]
    ds = sources.by_uid[uid]
    frames = [frame] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=ds.SOPClassUID,
        referenced_sop_instance_uid=uid,
        referenced_frame_numbers=frames,
    )


def _lesion_groups(
    result: InferenceResult, lesion: LesionFinding, seg: Dataset, key: ResultKey, variant: SrVariant, sources: _Sources
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    label = f"{result.codes.lesion_label} {lesion.number}"[:64]
    tracking = hd.sr.TrackingIdentifier(uid=key.tracking_uid(lesion.number), identifier=label)
    m = lesion.measurements
    volumetric_measurements = [
        hd.sr.Measurement(name=codes.VOLUME, value=round(m.volume_mm3, 2), unit=codes.CUBIC_MILLIMETER),
        _probability(result, lesion.probability),
    ]
    if m.mean_adc is not None:
        volumetric_measurements.append(
            hd.sr.Measurement(
                name=codes.APPARENT_DIFFUSION_COEFFICIENT,
                value=round(m.mean_adc, 1),
                unit=codes.SQUARE_MICROMETER_PER_SECOND,
                derivation=codes.MEAN,
            )
        )
    qualitative = (
        [hd.sr.QualitativeEvaluation(concept(result.codes.classification_concept), concept(lesion.category))]
        if lesion.category
        else None
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=lesion.number,
                source_series=hd.sr.SourceSeriesForSegmentation(sources.series_instance_uid),
            ),
            finding_type=concept(result.codes.lesion_finding_type),
            algorithm_id=_algorithm(result),
            finding_sites=_finding_sites(result),
            measurements=volumetric_measurements,
            qualitative_evaluations=qualitative,
        )
    ]
    if variant is SrVariant.VIEWER:
        # SCOORD pixel coordinates are (column, row), 0.5 at the first pixel's centre (PS3.3 C.18.6.1.1).
        outline = np.array([(c + 0.5, r + 0.5) for r, c in m.outline_rc], dtype=np.float32)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    source_image=_key_slice_image(result, lesion, sources),
                ),
                finding_type=concept(result.codes.lesion_finding_type),
                algorithm_id=_algorithm(result),
                finding_sites=_finding_sites(result),
                measurements=[
                    hd.sr.Measurement(name=codes.LONG_AXIS, value=round(m.long_axis_mm, 2), unit=codes.MILLIMETER),
                    hd.sr.Measurement(name=codes.SHORT_AXIS, value=round(m.short_axis_mm, 2), unit=codes.MILLIMETER),
                ],
            )
        )
    return groups


def _study_group(result: InferenceResult, key: ResultKey) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    finding = result.study_finding
    evaluations = [hd.sr.QualitativeEvaluation(concept(result.codes.classification_concept), concept(finding.category))]
    if not result.lesions:
        evaluations.append(hd.sr.QualitativeEvaluation(dcm_codes.DCM.Finding, concept(result.codes.no_finding)))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=key.study_tracking_uid, identifier="Study finding"),
        finding_type=concept(result.codes.study_finding_type),
        algorithm_id=_algorithm(result),
        finding_sites=_finding_sites(result),
        measurements=[_probability(result, finding.probability)],
        qualitative_evaluations=evaluations,
    )


QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def _study_evaluations(result: InferenceResult) -> hd.sr.ContainerContentItem:
    """TID 1500 row "Qualitative Evaluations" (CODE and TEXT items only): the category, "No abnormality"
    when nothing was found, and the study probability as text a person reads."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    finding = result.study_finding
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(concept(result.codes.classification_concept), concept(finding.category), contains)
    ]
    if not result.lesions:
        items.append(hd.sr.CodeContentItem(dcm_codes.DCM.Finding, concept(result.codes.no_finding), contains))
    probability = f"{finding.probability * 100:.0f} % (model {result.model.name} {result.model.version})"
    items.append(hd.sr.TextContentItem(concept(result.codes.probability_concept), probability, contains))
    container = hd.sr.ContainerContentItem(QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items, is_root=False)
    return container


def _move_study_finding(root: Dataset, result: InferenceResult) -> None:
    """Take the study group (the first) out of "Imaging Measurements" (dropping the container when no lesion
    group remains; highdicom insists on one group at construction) and add the qualitative evaluations."""
    content = root.ContentSequence
    for index, item in enumerate(content):
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
            del item.ContentSequence[0]
            if len(item.ContentSequence) == 0:
                del content[index]
            break
    content.append(_study_evaluations(result))


def _trunk(root: Dataset) -> Dataset:
    """The root content item without its children, for the SR constructor.

    highdicom's constructor deep-copies and re-parses the whole content tree it is given (for its ``content``
    view, which radfed never reads: results are re-read from their bytes) and walks it twice to find the
    instances it references (which :func:`radfed.dicom_sr.qa.verify_sr` checks against the evidence on the
    written SR). With 50 lesions that was 0.5 s of the 0.8 s the SR took; given the trunk, its cost no longer
    grows with the lesions, and the children are attached after, as the same sequence it would have attached.
    """
    trunk = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            trunk.add(element)
    trunk.ContentSequence = []  # highdicom requires the attribute
    return trunk


def build_sr(
    result: InferenceResult,
    seg: Dataset | None,
    profile: OutputProfile | None = None,
    predecessor: Dataset | None = None,
) -> Dataset:
    """The TID 1500 report for ``result``; ``seg`` is required when there are lesions.

    ``predecessor`` is the SR of an earlier model version (or earlier input) for the same study; it is
    named in PredecessorDocumentsSequence.
    """
    profile = profile or OutputProfile()
    if result.lesions and seg is None:
        raise ValueError("lesions need their SEG to be referenced")
    key = result_key(result)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [_study_group(result, key)]
    sources = _Sources.of(result) if result.lesions else None
    for lesion in result.lesions:
        assert seg is not None and sources is not None
        groups.extend(_lesion_groups(result, lesion, seg, key, profile.sr_variant, sources))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(result),
        procedure_reported=concept(result.codes.procedure),
        imaging_measurements=groups,
        title=dcm_codes.cid7021.ImagingMeasurementReport,
    )
    if profile.study_finding is StudyFindingPlacement.QUALITATIVE_EVALUATIONS:
        _move_study_finding(report[0], result)
    evidence = [*result.source_datasets, *result.evidence_datasets, *([seg] if seg is not None else [])]
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_trunk(root),
        series_instance_uid=key.sr_series_uid,
        series_number=profile.series_number_base + 1,
        sop_instance_uid=key.sr_instance_uid,
        instance_number=1,
        manufacturer=marking.RADFED_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description=marking.series_description(result.model, "SR"),
        manufacturer_model_name=result.model.name[:64],
        software_versions=marking.software_versions(result.model)[0],
        device_serial_number=marking.device_serial_number(result.model),
        contributing_equipment=marking.contributing_equipment(result.model),
        content_qualification=codes.CONTENT_QUALIFICATION,
    )
    sr.add(root["ContentSequence"])  # the element highdicom would have copied from the root
    sr.SoftwareVersions = marking.software_versions(result.model)  # type: ignore[assignment]
    return sr
