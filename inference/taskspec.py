"""The task spec: one TOML file describes a clinical task end to end (channels and how series are
selected, labels for training, preprocessing, model, output codes and thresholds), so training and
inference share one definition. ``prostate_mpmri.toml`` ships with radfed and is the default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from radfed.inference.coding import CodedTerm
from radfed.inference.errors import RadfedError
from radfed.inference.findings import ClassCategory, TaskCodes

DEFAULT_TASK = "prostate_mpmri"


class TaskSpecError(RadfedError, ValueError):
    """The task spec is malformed; the message names the field."""


class LabelSource(StrEnum):
    CSV = "csv"
    SR = "sr"


class StudyScore(StrEnum):
    """Where the study's probability comes from: the classification head's most suspicious window, the
    lesion map's most suspicious voxel (as in the PI-CAI challenge's case-level score), or the higher of
    the two."""

    CLASSIFIER = "classifier"
    LESION = "lesion"
    MAX = "max"


class Normalization(StrEnum):
    PERCENTILE = "percentile"
    ZSCORE = "zscore"
    LANDMARKS = "landmarks"  # federated harmonisation: piecewise-linear onto shared landmarks


@dataclass(frozen=True)
class ChannelRule:
    """How one input channel is found among a study's series."""

    name: str
    reference: bool
    modality: str
    description_regex: str | None
    exclude_regex: str | None
    image_type_any: tuple[str, ...]
    max_obliquity_deg: float
    slice_thickness_mm: tuple[float, float]
    min_slices: int
    min_b_value: float | None


@dataclass(frozen=True)
class SegmentationLabels:
    """Segments whose property type is one of these ``(scheme, value)`` codes are lesions."""

    lesion_property_types: tuple[tuple[str, str], ...]

    def is_lesion(self, property_type: CodedTerm | None) -> bool:
        return property_type is not None and (
            (property_type.scheme_designator, property_type.value) in self.lesion_property_types
        )


@dataclass(frozen=True)
class ClassificationLabels:
    source: LabelSource
    key: str
    column: str
    positive_values: tuple[str, ...]


@dataclass(frozen=True)
class Preprocessing:
    spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    normalization: Normalization
    percentiles: tuple[float, float]


@dataclass(frozen=True)
class ModelSettings:
    architecture: str
    features: tuple[int, ...]
    groups: int
    epochs: int
    batch_size: int
    learning_rate: float
    classification_weight: float


@dataclass(frozen=True)
class Outputs:
    lesion_threshold: float
    min_lesion_volume_mm3: float
    max_lesions: int
    adc_channel: str | None
    codes: TaskCodes
    study_score: StudyScore = StudyScore.CLASSIFIER


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    version: str
    channels: tuple[ChannelRule, ...]
    segmentation_labels: SegmentationLabels
    classification_labels: ClassificationLabels
    preprocessing: Preprocessing
    model: ModelSettings
    outputs: Outputs
    source_text: str  # the TOML as written (embedded in model artifacts)

    @property
    def reference_channel(self) -> ChannelRule:
        return next(channel for channel in self.channels if channel.reference)

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(channel.name for channel in self.channels)


class _Reader:
    """Typed access to the parsed TOML with errors that name the field."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self._data = data
        self._where = where

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def section(self, key: str) -> _Reader:
        value = self._data.get(key)
        if not isinstance(value, dict):
            raise TaskSpecError(f"[{self._path(key)}] is missing or not a table")
        return _Reader(value, self._path(key))

    def sections(self, key: str) -> list[_Reader]:
        value = self._data.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise TaskSpecError(f"[[{self._path(key)}]] must be a non-empty array of tables")
        return [_Reader(v, f"{self._path(key)}[{i}]") for i, v in enumerate(value)]

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self._data:
            if default is ...:
                raise TaskSpecError(f"{self._path(key)} is required")
            return default
        value = self._data[key]
        if isinstance(value, bool) and kind in (int, float):
            raise TaskSpecError(f"{self._path(key)} must be a number, got {value!r}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise TaskSpecError(f"{self._path(key)} has the wrong type: {value!r}")
        return value

    def numbers(self, key: str, length: int, kind: type, default: Any = ...) -> tuple[Any, ...]:
        value = self.get(key, list, default)
        if value is default and default is not ...:
            return tuple(default)
        if len(value) != length or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise TaskSpecError(f"{self._path(key)} must be {length} numbers, got {value!r}")
        return tuple(kind(v) for v in value)

    def code(self, key: str, default: Any = ...) -> CodedTerm | None:
        text = self.get(key, str, default)
        if text is None:
            return None
        try:
            return CodedTerm.parse(text)
        except ValueError as exc:
            raise TaskSpecError(f"{self._path(key)}: {exc}") from exc

    def regex(self, key: str) -> str | None:
        pattern = self.get(key, str, None)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise TaskSpecError(f"{self._path(key)} is not a valid regular expression: {exc}") from exc
        return pattern

    def choice(self, key: str, enum: type[StrEnum], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        try:
            return enum(value)
        except ValueError:
            options = ", ".join(v.value for v in enum)
            raise TaskSpecError(f"{self._path(key)} = {value!r} is not one of {options}") from None


def _channel(r: _Reader) -> ChannelRule:
    thickness = r.numbers("slice_thickness_mm", 2, float, (0.0, 1000.0))
    image_type_any = r.get("image_type_any", list, [])
    return ChannelRule(
        name=r.get("name", str),
        reference=r.get("reference", bool, False),
        modality=r.get("modality", str),
        description_regex=r.regex("description_regex"),
        exclude_regex=r.regex("exclude_regex"),
        image_type_any=tuple(str(v).upper() for v in image_type_any),
        max_obliquity_deg=r.get("max_obliquity_deg", float, 90.0),
        slice_thickness_mm=(thickness[0], thickness[1]),
        min_slices=r.get("min_slices", int, 1),
        min_b_value=r.get("min_b_value", float, None),
    )


def parse_task_spec(text: str, origin: str = "<task spec>") -> TaskSpec:
    """Parse and validate a task spec's TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskSpecError(f"{origin}: not valid TOML: {exc}") from exc
    root = _Reader(data, "")
    task = root.section("task")
    channels = tuple(_channel(r) for r in root.sections("channels"))
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise TaskSpecError(f"channel names must be unique, got {names}")
    references = [c.name for c in channels if c.reference]
    if len(references) != 1:
        raise TaskSpecError(f"exactly one channel must have reference = true, got {references or 'none'}")
    labels = root.section("labels")
    seg = labels.section("segmentation")
    lesion_types = []
    for i, text_code in enumerate(seg.get("lesion_property_types", list)):
        scheme, _, value = str(text_code).partition(":")
        if not scheme or not value:
            raise TaskSpecError(
                f"labels.segmentation.lesion_property_types[{i}] must be SCHEME:VALUE, got {text_code!r}"
            )
        lesion_types.append((scheme.strip(), value.split(":")[0].strip()))
    cls = labels.section("classification")
    pre = root.section("preprocessing")
    spacing = pre.numbers("spacing_mm", 3, float)
    patch = pre.numbers("patch_size", 3, int)
    if any(p % 4 for p in patch[1:]) or patch[0] % 2:
        raise TaskSpecError(f"preprocessing.patch_size {list(patch)} must be divisible by the U-Net's pooling")
    model = root.section("model")
    out = root.section("outputs")
    categories = tuple(
        ClassCategory(c.code("code"), c.get("min_probability", float))  # type: ignore[arg-type]
        for c in out.sections("categories")
    )
    try:
        codes = TaskCodes(
            procedure=out.code("procedure"),  # type: ignore[arg-type]
            finding_site=out.code("finding_site", None),
            lesion_label=out.get("lesion_label", str),
            lesion_category=out.code("lesion_category"),  # type: ignore[arg-type]
            lesion_type=out.code("lesion_type"),  # type: ignore[arg-type]
            lesion_finding_type=out.code("lesion_finding_type"),  # type: ignore[arg-type]
            study_finding_type=out.code("study_finding_type"),  # type: ignore[arg-type]
            probability_concept=out.code("probability_concept"),  # type: ignore[arg-type]
            classification_concept=out.code("classification_concept"),  # type: ignore[arg-type]
            categories=categories,
            no_finding=out.code("no_finding"),  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise TaskSpecError(f"outputs: {exc}") from exc
    adc_channel = out.get("adc_channel", str, None)
    if adc_channel is not None and adc_channel not in names:
        raise TaskSpecError(f"outputs.adc_channel {adc_channel!r} is not a channel ({', '.join(names)})")
    key = cls.get("key", str)
    if key not in ("StudyInstanceUID", "AccessionNumber"):
        raise TaskSpecError(f"labels.classification.key must be StudyInstanceUID or AccessionNumber, got {key!r}")
    return TaskSpec(
        name=task.get("name", str),
        title=task.get("title", str, ""),
        version=str(task.get("version", str, "1")),
        channels=channels,
        segmentation_labels=SegmentationLabels(tuple(lesion_types)),
        classification_labels=ClassificationLabels(
            source=cls.choice("source", LabelSource),
            key=key,
            column=cls.get("column", str),
            positive_values=tuple(str(v).lower() for v in cls.get("positive_values", list)),
        ),
        preprocessing=Preprocessing(
            spacing_mm=(spacing[0], spacing[1], spacing[2]),
            patch_size=(patch[0], patch[1], patch[2]),
            normalization=pre.choice("normalization", Normalization, "percentile"),
            percentiles=pre.numbers("percentiles", 2, float, (1.0, 99.0)),
        ),
        model=ModelSettings(
            architecture=model.get("architecture", str),
            features=tuple(int(f) for f in model.get("features", list)),
            groups=model.get("groups", int),
            epochs=model.get("epochs", int),
            batch_size=model.get("batch_size", int),
            learning_rate=model.get("learning_rate", float),
            classification_weight=model.get("classification_weight", float, 0.5),
        ),
        outputs=Outputs(
            lesion_threshold=out.get("lesion_threshold", float),
            min_lesion_volume_mm3=out.get("min_lesion_volume_mm3", float),
            max_lesions=out.get("max_lesions", int, 20),
            adc_channel=adc_channel,
            codes=codes,
            study_score=out.choice("study_score", StudyScore, StudyScore.CLASSIFIER.value),
        ),
        source_text=text,
    )


def load_task_spec(path_or_name: str | Path | None = None) -> TaskSpec:
    """A spec from a file path, or a shipped spec by name (default: prostate mpMRI)."""
    if path_or_name is None:
        path_or_name = DEFAULT_TASK
    path = Path(path_or_name)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise TaskSpecError(f"task spec {path} not found")
        return parse_task_spec(path.read_text(), str(path))
    shipped = resources.files("radfed.inference") / "tasks" / f"{path_or_name}.toml"
    if not shipped.is_file():
        available = sorted(
            p.name.removesuffix(".toml")
            for p in (resources.files("radfed.inference") / "tasks").iterdir()
            if p.name.endswith(".toml")
        )
        raise TaskSpecError(f"no shipped task spec {path_or_name!r}; shipped: {', '.join(available)}")
    return parse_task_spec(shipped.read_text(), f"radfed:{path_or_name}")
