"""How simulated hospitals differ: vendor naming, grids, intensity scale, bias field, noise.

The differences are the ones that make real multi-site MRI non-IID: vendors name series differently,
sample at different resolutions and slice thicknesses, and scale intensities arbitrarily (T2W has no
absolute unit), while ADC is quantitative but stored with vendor-specific rescale parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from radfed.inference.testing.synthetic.phantom import Tissue


class Sequence(StrEnum):
    T2W = "t2w"
    ADC = "adc"
    DWI = "dwi"


@dataclass(frozen=True)
class SeriesNaming:
    description: str
    sequence_name: str
    image_type: tuple[str, ...]
    scanning_sequence: str
    sequence_variant: str


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    model_name: str
    software_version: str
    naming: dict[Sequence, SeriesNaming]
    # Some vendors send slices head-first (descending InstanceNumber along the slice normal).
    instances_head_first: bool


VENDORS: tuple[Vendor, ...] = (
    Vendor(
        "SIEMENS",
        "MAGNETOM Skyra",
        "syngo MR E11",
        {
            Sequence.T2W: SeriesNaming(
                "t2_tse_tra", "*tse2d1_25", ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"), "SE", "SK\\SP\\OSP"
            ),
            Sequence.ADC: SeriesNaming(
                "ep2d_diff_b50_800_tra_ADC",
                "*ep_b50_800",
                ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
                "EP",
                "SK\\SP",
            ),
            Sequence.DWI: SeriesNaming(
                "ep2d_diff_b1400_tra_TRACEW",
                "*ep_b1400t",
                ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"),
                "EP",
                "SK\\SP",
            ),
        },
        instances_head_first=False,
    ),
    Vendor(
        "GE MEDICAL SYSTEMS",
        "DISCOVERY MR750",
        "DV26.0_R01",
        {
            Sequence.T2W: SeriesNaming("Ax T2 FRFSE", "frfseopt", ("ORIGINAL", "PRIMARY", "OTHER"), "SE", "SK"),
            Sequence.ADC: SeriesNaming(
                "Apparent Diffusion Coefficient (mm2/s)", "", ("DERIVED", "PRIMARY", "ADC"), "EP", "SK"
            ),
            Sequence.DWI: SeriesNaming("Ax DWI b1400", "epi2", ("ORIGINAL", "PRIMARY", "OTHER"), "EP", "SK"),
        },
        instances_head_first=True,
    ),
    Vendor(
        "Philips Medical Systems",
        "Ingenia",
        "5.4.1",
        {
            Sequence.T2W: SeriesNaming("T2W_TSE_ax", "TSE", ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), "SE", "SK"),
            Sequence.ADC: SeriesNaming("dADC", "", ("DERIVED", "PRIMARY", "ADC", "ADC"), "EP", "SK"),
            Sequence.DWI: SeriesNaming("DWI_b1400_ax", "", ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), "EP", "SK"),
        },
        instances_head_first=False,
    ),
)


# Tissue signal per sequence before site scaling. T2W in arbitrary units, ADC in 1e-6 mm2/s
# (typical literature values: PZ ~1600-1800, TZ ~1200-1400, cancer ~700-1000), DWI b=1400 arbitrary.
_SIGNAL: dict[Sequence, dict[Tissue, float]] = {
    Sequence.T2W: {
        Tissue.AIR: 0,
        Tissue.FAT: 700,
        Tissue.MUSCLE: 260,
        Tissue.BLADDER: 1500,
        Tissue.RECTUM: 160,
        Tissue.TRANSITION_ZONE: 520,
        Tissue.PERIPHERAL_ZONE: 950,
        Tissue.LESION: 330,
    },
    Sequence.ADC: {
        Tissue.AIR: 0,
        Tissue.FAT: 150,
        Tissue.MUSCLE: 1400,
        Tissue.BLADDER: 2900,
        Tissue.RECTUM: 900,
        Tissue.TRANSITION_ZONE: 1300,
        Tissue.PERIPHERAL_ZONE: 1700,
        Tissue.LESION: 850,
    },
    Sequence.DWI: {
        Tissue.AIR: 0,
        Tissue.FAT: 40,
        Tissue.MUSCLE: 70,
        Tissue.BLADDER: 50,
        Tissue.RECTUM: 60,
        Tissue.TRANSITION_ZONE: 130,
        Tissue.PERIPHERAL_ZONE: 110,
        Tissue.LESION: 420,
    },
}


def tissue_signal(sequence: Sequence, grade_group: int = 0) -> dict[Tissue, float]:
    """Signal per tissue; lesions of higher grade restrict diffusion more (lower ADC, brighter DWI)."""
    signal = dict(_SIGNAL[sequence])
    if grade_group:
        if sequence is Sequence.ADC:
            signal[Tissue.LESION] = 1150 - 90 * grade_group
        elif sequence is Sequence.DWI:
            signal[Tissue.LESION] = 260 + 60 * grade_group
    return signal


@dataclass(frozen=True)
class SeriesGrid:
    """Acquisition grid of one series."""

    rows: int
    columns: int
    slices: int
    pixel_spacing: float  # mm, square pixels
    slice_thickness: float  # mm (= spacing between slices: contiguous 2-D slices)


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one simulated hospital's images its own."""

    index: int
    vendor: Vendor
    institution_name: str
    field_strength_t: float
    grids: dict[Sequence, SeriesGrid]
    intensity_scale: float  # T2W and DWI scanner gain
    intensity_offset: float
    bias_strength: float  # amplitude of the smooth multiplicative field
    noise_fraction: float  # noise sigma as a fraction of the mean gland signal
    adc_rescale: tuple[float, float]  # (RescaleSlope, RescaleIntercept) the vendor stores ADC with
    oblique_probability: float

    @property
    def name(self) -> str:
        return f"site-{self.index}"


def site_profile(index: int, *, small: bool = False) -> SiteProfile:
    """The profile of site ``index`` (1-based); deterministic, so a seed fixes the whole federation.

    ``small`` halves the in-plane matrices (same field of view), for fast tests.
    """
    vendor = VENDORS[(index - 1) % len(VENDORS)]
    rng = np.random.default_rng(1000 + index)
    if index == 1:
        # The reference site: 3 x 24 x 256 x 256 (the benchmark's study size).
        t2 = SeriesGrid(256, 256, 24, 0.625, 3.0)
        dwi = SeriesGrid(256, 256, 24, 0.625, 3.0)
    else:
        matrix = int(rng.choice([256, 288, 320]))
        fov = float(rng.uniform(160, 200))
        slices = int(rng.choice([20, 24, 28]))
        t2 = SeriesGrid(matrix, matrix, slices, round(fov / matrix, 4), float(rng.choice([3.0, 3.5])))
        dwi_matrix = int(rng.choice([128, 160]))
        dwi = SeriesGrid(dwi_matrix, dwi_matrix, slices - 4, round(fov / dwi_matrix, 4), float(rng.choice([3.5, 4.0])))
    if small:
        t2 = SeriesGrid(t2.rows // 2, t2.columns // 2, t2.slices, t2.pixel_spacing * 2, t2.slice_thickness)
        dwi = SeriesGrid(dwi.rows // 2, dwi.columns // 2, dwi.slices, dwi.pixel_spacing * 2, dwi.slice_thickness)
    adc_rescale = {"SIEMENS": (1.0, 0.0), "GE MEDICAL SYSTEMS": (1.0, 0.0)}.get(vendor.manufacturer, (0.5, 0.0))
    return SiteProfile(
        index=index,
        vendor=vendor,
        institution_name=f"Synthetic Hospital {index}",
        field_strength_t=float(rng.choice([1.5, 3.0])),
        grids={Sequence.T2W: t2, Sequence.ADC: dwi, Sequence.DWI: dwi},
        intensity_scale=1.0 if index == 1 else float(rng.uniform(0.5, 2.2)),
        intensity_offset=0.0 if index == 1 else float(rng.uniform(-30, 120)),
        bias_strength=float(rng.uniform(0.05, 0.35)),
        noise_fraction=float(rng.uniform(0.02, 0.07)),
        adc_rescale=adc_rescale,
        oblique_probability=float(rng.uniform(0.2, 0.6)),
    )
