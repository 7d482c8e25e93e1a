"""The subgroups a site derives from its studies' DICOM headers for the bias checks, and the one form in which
a subgroup's evaluation may leave the site: a cell of at least ``k`` studies.

The vocabulary is closed (an enum per attribute), so a cell's name can never carry header text: the vendor is
the Manufacturer mapped onto a few names, MagneticFieldStrength a band, the age a decade (from PatientAge, or
PatientBirthDate and StudyDate; 90 and over in one band, as HIPAA's Safe Harbor asks), the sex M / F / O.
This module imports nothing of radfed, so the allow-list (``radfed.federation.learning.messages``) can check a cell
against it."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

MIN_CELL_FLOOR = 2  # bias-min-cell below this would send one study's own figures
UNKNOWN = "unknown"


class Attribute(StrEnum):
    VENDOR = "vendor"
    FIELD_STRENGTH = "field-strength"
    AGE = "age"
    SEX = "sex"


class Vendor(StrEnum):
    SIEMENS = "siemens"
    GE = "ge"
    PHILIPS = "philips"
    CANON = "canon"  # and Toshiba, its former name
    FUJIFILM = "fujifilm"  # and Hitachi
    UNITED_IMAGING = "united-imaging"
    OTHER = "other"
    UNKNOWN = UNKNOWN


class FieldStrength(StrEnum):
    T1_5 = "1.5T"
    T3 = "3T"
    OTHER = "other"
    UNKNOWN = UNKNOWN


class Sex(StrEnum):
    MALE = "M"
    FEMALE = "F"
    OTHER = "O"
    UNKNOWN = UNKNOWN


AGE_BANDS = (*(f"{d}-{d + 9}" for d in range(0, 90, 10)), "90+", UNKNOWN)
VALUES: dict[Attribute, tuple[str, ...]] = {
    Attribute.VENDOR: tuple(Vendor),
    Attribute.FIELD_STRENGTH: tuple(FieldStrength),
    Attribute.AGE: AGE_BANDS,
    Attribute.SEX: tuple(Sex),
}

_VENDOR_NAMES = (  # substrings of the upper-cased Manufacturer
    (("SIEMENS",), Vendor.SIEMENS),
    (("GE MEDICAL", "GE HEALTHCARE", "GEMS"), Vendor.GE),
    (("PHILIPS",), Vendor.PHILIPS),
    (("CANON", "TOSHIBA"), Vendor.CANON),
    (("FUJIFILM", "HITACHI"), Vendor.FUJIFILM),
    (("UIH", "UNITED IMAGING"), Vendor.UNITED_IMAGING),
)


class Header(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class StudySubgroups:
    """One study's value of every attribute (``unknown`` where its header does not say)."""

    vendor: str = Vendor.UNKNOWN
    field_strength: str = FieldStrength.UNKNOWN
    age: str = UNKNOWN
    sex: str = Sex.UNKNOWN

    def value(self, attribute: Attribute) -> str:
        return str(getattr(self, attribute.value.replace("-", "_")))


def vendor_of(manufacturer: object) -> Vendor:
    text = str(manufacturer or "").strip().upper()
    if not text:
        return Vendor.UNKNOWN
    if text == "GE":
        return Vendor.GE
    return next((vendor for names, vendor in _VENDOR_NAMES if any(n in text for n in names)), Vendor.OTHER)


def field_strength_of(value: object) -> FieldStrength:
    try:
        tesla = float(str(value))
    except ValueError:
        return FieldStrength.UNKNOWN
    if not math.isfinite(tesla) or tesla <= 0:
        return FieldStrength.UNKNOWN
    if tesla > 100:  # some older scanners write gauss (15000)
        tesla /= 10000
    if abs(tesla - 1.5) <= 0.1:
        return FieldStrength.T1_5
    if abs(tesla - 3.0) <= 0.1:
        return FieldStrength.T3
    return FieldStrength.OTHER


def age_band(years: float | None) -> str:
    if years is None or years < 0 or years > 130:
        return UNKNOWN
    return "90+" if years >= 90 else AGE_BANDS[int(years) // 10]


def _date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def age_in_years(header: Header) -> float | None:
    """PatientAge (``065Y``; days, weeks and months are under a year), else StudyDate - PatientBirthDate."""
    found = re.fullmatch(r"(\d{1,3})([DWMY])", str(header.get("PatientAge", "") or "").strip().upper())
    if found:
        return float(found.group(1)) if found.group(2) == "Y" else 0.0
    birth, study = _date(header.get("PatientBirthDate")), _date(header.get("StudyDate"))
    if birth is None or study is None:
        return None
    return (study - birth).days / 365.25


def subgroups_from_header(header: Header | None) -> StudySubgroups:
    """A study's subgroups from one of its image headers (not a SEG's: its Manufacturer is the SEG's writer)."""
    if header is None:
        return StudySubgroups()
    sex = str(header.get("PatientSex", "") or "").strip().upper()
    return StudySubgroups(
        vendor=vendor_of(header.get("Manufacturer")),
        field_strength=field_strength_of(header.get("MagneticFieldStrength")),
        age=age_band(age_in_years(header)),
        sex=Sex(sex) if sex in ("M", "F", "O") else Sex.UNKNOWN,
    )


# A cell as a metric: ``subgroup.<attribute>.<value>`` -> [k, studies, Dice studies, Dice sum, Dice sum of squares,
# positive-score histogram, negative-score histogram]. Dice's part is zero unless it rests on >= k studies, the
# histograms unless each label has >= k studies.
CELL_PREFIX = "subgroup."
HEAD = 5  # k, studies, dice studies, dice sum, dice sum of squares
SUPPRESSED = "subgroup_suppressed"  # per attribute (Attribute order): studies in cells that did not leave


def cell_name(attribute: Attribute, value: str) -> str:
    return f"{CELL_PREFIX}{attribute.value}.{value}"


def parse_cell_name(name: str) -> tuple[Attribute, str] | None:
    """(attribute, value) of a cell's metric name; None unless both are in the closed vocabulary."""
    attribute, _, value = name.removeprefix(CELL_PREFIX).partition(".")
    if not name.startswith(CELL_PREFIX) or attribute not in tuple(Attribute):
        return None
    return (Attribute(attribute), value) if value in VALUES[Attribute(attribute)] else None


def cell_length(score_bins: int) -> int:
    return HEAD + 2 * score_bins


def _count(value: float) -> bool:
    return math.isfinite(value) and value >= 0 and float(value).is_integer()


def cell_problem(name: str, vector: Sequence[float], score_bins: int) -> str | None:
    """Why this cell may not leave a site (None: it may): a name outside the vocabulary, a malformed vector,
    or any figure in it resting on fewer than ``k`` studies."""
    if parse_cell_name(name) is None:
        return "not a subgroup of the closed vocabulary"
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vector)
    if len(vector) != cell_length(score_bins) or not numbers or not all(math.isfinite(float(v)) for v in vector):
        return f"must hold {cell_length(score_bins)} finite numbers"
    k, studies, dice_studies, dice_sum, dice_squares = (float(v) for v in vector[:HEAD])
    positive, negative = vector[HEAD : HEAD + score_bins], vector[HEAD + score_bins :]
    counts = [k, studies, dice_studies, *positive, *negative]
    if not all(_count(float(v)) for v in counts):
        return "counts must be whole numbers >= 0"
    if k < MIN_CELL_FLOOR or studies < k:
        return f"{studies:g} studies, below the minimum cell of {k:g} (floor {MIN_CELL_FLOOR})"
    if dice_studies and not k <= dice_studies <= studies:
        return f"Dice over {dice_studies:g} studies (minimum {k:g}, at most {studies:g})"
    if not 0 <= dice_sum <= dice_studies or not 0 <= dice_squares <= dice_studies:
        return "Dice sums out of range"
    labelled = (sum(positive), sum(negative))
    if any(labelled) and (min(labelled) < k or sum(labelled) > studies):
        return f"score histograms over {labelled} studies (each label needs >= {k:g})"
    return None
