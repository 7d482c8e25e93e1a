"""Every coded concept radfed emits into DICOM that is not task-specific (those come from the task spec).

Values are from DICOM PS3.16 (DCM, CID 7000-series), SNOMED CT and UCUM, as listed in pydicom's
code dictionary. Concepts without a standard code use radfed's private scheme ``99RADFED``.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes

from radfed.inference.coding import CodedTerm

PRIVATE_SCHEME = "99RADFED"

# Template structure (TID 1500, TID 1410/1411, TID 300)
VOLUME = codes.SCT.Volume
LONG_AXIS = codes.SCT.LongAxis
SHORT_AXIS = codes.SCT.ShortAxis
MEAN = codes.SCT.Mean
APPARENT_DIFFUSION_COEFFICIENT = codes.DCM.ApparentDiffusionCoefficient
ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # algorithm family, DCM 123110
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment
NO_ABNORMALITY = codes.DCM.NoAbnormality

# Units (UCUM)
CUBIC_MILLIMETER = codes.UCUM.CubicMillimeter
MILLIMETER = codes.UCUM.Millimeter
PERCENT = codes.UCUM.Percent
SQUARE_MICROMETER_PER_SECOND = codes.UCUM.SquareMicrometerPerSecond  # ADC in 1e-6 mm2/s = um2/s

# Private: labels a study-level group (it carries no image reference).
STUDY_LEVEL_FINDING = CodedTerm("STUDY", PRIVATE_SCHEME, "Study-level AI finding")

# Content Qualification (0018,9004): results are for research use.
CONTENT_QUALIFICATION = "RESEARCH"
