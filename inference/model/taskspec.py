"""The task spec: one TOML file describes a clinical task end to end (channels and how series are
selected, labels for training, preprocessing, model, output codes and thresholds), so training and
inference share one definition. ``prostate_mpmri.toml`` ships with radfed and is the default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from radfed.inference.coding import CodedTerm
from radfed.inference.errors import RadfedError
from radfed.inference.model.plan import Architecture, Normalization, Plan, PlanError, PlanOverrides
from radfed.inference.model.recipe import (
    Augmentation,
    DiceOver,
    ForegroundSampling,
    Optimizer,
    PasteInto,
    Schedule,
    TrainingRecipe,
)
from radfed.inference.pipeline.findings import ClassCategory, TaskCodes

DEFAULT_TASK = "prostate_mpmri"
MAX_ENSEMBLE = 8  # networks in one model: each costs its training and its inference time


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


__all__ = ["Normalization", "StudyScore", "TaskSpec", "TaskSpecError", "load_task_spec", "parse_task_spec"]

# Generic SR codes for a task that names none (any lesion task, not only prostate).
GENERIC_CODES = {
    "procedure": "DCM:113014:Study",
    "lesion_category": "SCT:49755003:Morphologically Abnormal Structure",
    "lesion_type": "SCT:52988006:Lesion",
    "lesion_finding_type": "SCT:52988006:Lesion",
    "study_finding_type": "DCM:121071:Finding",
    "probability_concept": "DCM:111047:Probability of cancer",
    "classification_concept": "DCM:121071:Finding",
    "no_finding": "DCM:111286:No abnormality",
}


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
    """What the spec fixes; ``None`` means "derived by the plan from the training data"."""

    spacing_mm: tuple[float, float, float] | None
    patch_size: tuple[int, int, int] | None
    normalization: Normalization | None
    percentiles: tuple[float, float]


@dataclass(frozen=True)
class ModelSettings:
    """The network the spec asks for; unset parts come from the plan."""

    architecture: Architecture
    spatial_dims: int | None
    features: tuple[int, ...] | None
    groups: int
    norm: str
    batch_size: int | None
    deep_supervision: int | None
    context_slices: int = 0  # 2.5-D: neighbouring slices as input channels of a 2-D network
    residual: bool = False  # DynUNet with residual blocks (nnU-Net's residual encoder presets)
    # Networks trained side by side from other initial weights and patch draws, their probabilities averaged in
    # one exported model (nnU-Net ensembles its folds' models); local training only: a federation trains one.
    ensemble: int = 1


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding window: overlap between windows, Gaussian importance weighting, mirroring test-time
    augmentation along the recipe's flip axes."""

    overlap: float = 0.5
    gaussian: bool = True
    # Measured on the real brain set (bench quality, same models): Dice 0.59 -> 0.61, false-positive components
    # 3.1 -> 2.4 per study, for twice the model time on the flip axes.
    mirror: bool = True


@dataclass(frozen=True)
class Outputs:
    lesion_threshold: float
    min_lesion_volume_mm3: float
    max_lesions: int
    adc_channel: str | None
    codes: TaskCodes
    study_score: StudyScore = StudyScore.CLASSIFIER
    study_temperature: float = 1.0  # divides the classification logit (calibrated on validation data)
    # Components smaller than this share of a study's largest are dropped; None: chosen in training from the
    # reference masks or validation studies (0 where nothing chose it).
    min_lesion_fraction: float | None = None
    # Components spanning fewer slices of the model grid are dropped (2: a "lesion" seen on one slice only, the
    # typical false positive of a 2-D network); None: chosen in training from the reference masks (1 otherwise).
    min_lesion_slices: int | None = None

    @property
    def lesion_fraction(self) -> float:
        return self.min_lesion_fraction or 0.0

    @property
    def lesion_slices(self) -> int:
        return self.min_lesion_slices or 1


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
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    plan: Plan | None = None  # set once derived (training) or read back (artifact)

    def plan_overrides(self) -> PlanOverrides:
        """What the spec fixes of the plan."""
        pre, model = self.preprocessing, self.model
        return PlanOverrides(
            modalities={c.name: c.modality for c in self.channels},
            spacing_mm=pre.spacing_mm,
            patch_size=pre.patch_size,
            spatial_dims=model.spatial_dims,
            batch_size=model.batch_size,
            normalization=pre.normalization,
            architecture=model.architecture,
            filters=model.features,
            norm=model.norm,
            groups=model.groups,
            deep_supervision=model.deep_supervision,
            context_slices=model.context_slices,
            residual=model.residual,
        )

    @property
    def input_channels(self) -> int:
        """The network's input channels: the image channels, times the slices a 2.5-D network sees."""
        channels = len(self.channels)
        return self.plan.network.input_channels(channels) if self.plan is not None else channels

    def planned(self, plan: Plan) -> TaskSpec:
        """This spec with its plan (and so its grid, patch, normalisation and network) fixed."""
        return replace(self, plan=plan)

    def with_outputs(self, **changes: object) -> TaskSpec:
        """This spec with output settings replaced (thresholds calibrated on validation data)."""
        return replace(self, outputs=replace(self.outputs, **changes))  # type: ignore[arg-type]

    def _require_plan(self, what: str) -> Plan:
        if self.plan is None:
            raise PlanError(f"task {self.name!r}: {what} is known only once the plan is derived")
        return self.plan

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """The model grid's voxel spacing (slice, row, column)."""
        if self.plan is None and self.preprocessing.spacing_mm is not None:
            return self.preprocessing.spacing_mm
        return self._require_plan("the model grid").spacing_mm

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The model input's spatial size (slice, row, column); (1, rows, columns) for a 2-D network."""
        return self._require_plan("the patch size").patch_size

    def normalization_of(self, channel: str) -> Normalization:
        if self.plan is None and self.preprocessing.normalization is not None:
            return self.preprocessing.normalization
        return self._require_plan("the normalisation").normalization[channel]

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


def _model(r: _Reader, patch: tuple[int, ...] | None) -> ModelSettings:
    architecture = r.choice("architecture", Architecture, Architecture.DYNUNET.value)
    dims_text = r.get("spatial_dims", (int, str), "auto")
    if dims_text not in ("auto", 2, 3):
        raise TaskSpecError(f'model.spatial_dims must be 2, 3 or "auto", got {dims_text!r}')
    features = r.get("features", list, None)
    if architecture is Architecture.UNET3D:
        if patch is None or any(p % 4 for p in patch[1:]) or patch[0] % 2:
            raise TaskSpecError(f"preprocessing.patch_size {patch} must be divisible by the U-Net's pooling")
        if features is None or len(features) != 3:
            raise TaskSpecError("model.features must name three levels for unet3d")
    norm = r.get("norm", str, "instance")
    if norm not in ("instance", "group"):
        raise TaskSpecError(f"model.norm must be instance or group (DP-SGD forbids batch norm), got {norm!r}")
    context = r.get("context_slices", int, 0)
    if not 0 <= context <= 3 or (context and dims_text == 3):
        raise TaskSpecError(f"model.context_slices must be 0-3 and needs a 2-D network, got {context}")
    residual = r.get("residual", bool, False)
    if residual and architecture is not Architecture.DYNUNET:
        raise TaskSpecError(
            f"model.residual applies to dynunet; {architecture.value} is "
            + ("residual already" if architecture in (Architecture.SEGRESNET, Architecture.UNET) else "not residual")
        )
    ensemble = r.get("ensemble", int, 1)
    if not 1 <= ensemble <= MAX_ENSEMBLE:
        raise TaskSpecError(f"model.ensemble must be 1-{MAX_ENSEMBLE} networks, got {ensemble}")
    return ModelSettings(
        architecture=architecture,
        spatial_dims=None if dims_text == "auto" else int(dims_text),
        features=tuple(int(f) for f in features) if features is not None else None,
        groups=r.get("groups", int, 8),
        norm=norm,
        batch_size=r.get("batch_size", int, None),
        deep_supervision=r.get("deep_supervision", int, None),
        context_slices=context,
        residual=residual,
        ensemble=ensemble,
    )


def _training(r: _Reader | None, channels: int) -> TrainingRecipe:
    if r is None:
        return TrainingRecipe()
    default = TrainingRecipe()
    augmentations = r.get("augmentations", list, [a.value for a in default.augmentations])
    try:
        augmentation = tuple(Augmentation(a) for a in augmentations)
    except ValueError:
        raise TaskSpecError(
            f"training.augmentations {augmentations!r}: each one of {', '.join(a.value for a in Augmentation)}"
        ) from None
    flip_axes = tuple(int(a) for a in r.get("flip_axes", list, list(default.flip_axes)))
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise TaskSpecError(f"training.flip_axes must name axes 0 (slice), 1 (row), 2 (column), got {flip_axes}")
    fraction = r.get("foreground_fraction", float, default.foreground_fraction)
    validation = r.get("validation_fraction", float, default.validation_fraction)
    paste = r.get("lesion_paste", float, default.lesion_paste)
    if not 0 <= fraction <= 1 or not 0 <= paste <= 1 or not 0 <= validation < 1:
        raise TaskSpecError(
            "training.foreground_fraction and lesion_paste must be in [0, 1] and validation_fraction in [0, 1)"
        )
    scale = r.numbers("scale_range", 2, float, default.scale_range)
    recipe = TrainingRecipe(
        steps=r.get("steps", int, default.steps),
        learning_rate=r.get("learning_rate", float, default.learning_rate),
        optimizer=r.choice("optimizer", Optimizer, default.optimizer.value),
        schedule=r.choice("schedule", Schedule, default.schedule.value),
        weight_decay=r.get("weight_decay", float, default.weight_decay),
        momentum=r.get("momentum", float, default.momentum),
        warmup_steps=r.get("warmup_steps", int, default.warmup_steps),
        dice_weight=r.get("dice_weight", float, default.dice_weight),
        ce_weight=r.get("ce_weight", float, default.ce_weight),
        ce_positive_weight=r.get("ce_positive_weight", float, default.ce_positive_weight),
        dice_over=r.choice("dice_over", DiceOver, default.dice_over.value),
        classification_weight=r.get("classification_weight", float, default.classification_weight),
        foreground_fraction=fraction,
        foreground_jitter=r.get("foreground_jitter", float, default.foreground_jitter),
        foreground_sampling=r.choice("foreground_sampling", ForegroundSampling, default.foreground_sampling.value),
        lesion_paste=paste,
        paste_into=r.choice("paste_into", PasteInto, default.paste_into.value),
        augmentations=augmentation,
        flip_axes=flip_axes,
        rotation_deg=r.get("rotation_deg", float, default.rotation_deg),
        scale_range=(scale[0], scale[1]),
        augmentation_probability=r.get("augmentation_probability", float, default.augmentation_probability),
        validation_fraction=validation,
        min_validation_cohort=r.get("min_validation_cohort", int, default.min_validation_cohort),
        validate_every=r.get("validate_every", int, default.validate_every),
        validation_share=r.get("validation_share", float, default.validation_share),
        time_limit_minutes=r.get("time_limit_minutes", float, default.time_limit_minutes),
        threads=r.get("threads", int, default.threads),
        mixed_precision=r.get("mixed_precision", bool, default.mixed_precision),
        cpu_mixed_precision=r.get("cpu_mixed_precision", bool, default.cpu_mixed_precision),
        calibrate=r.get("calibrate", bool, default.calibrate),
    )
    if (
        (recipe.steps is not None and recipe.steps < 1)
        or recipe.learning_rate <= 0
        or recipe.threads < 0
        or recipe.validate_every < 1
        or not 0 < recipe.validation_share <= 1
    ):
        raise TaskSpecError(
            "training.steps, learning_rate and validate_every must be positive, threads >= 0 (0: auto), "
            "validation_share in (0, 1]"
        )
    if recipe.steps is None and recipe.time_limit_minutes <= 0:
        raise TaskSpecError("training.steps is needed when time_limit_minutes is 0 (no budget to fill)")
    return recipe


def _inference(r: _Reader | None) -> InferenceSettings:
    if r is None:
        return InferenceSettings()
    overlap = r.get("overlap", float, 0.5)
    if not 0 <= overlap < 1:
        raise TaskSpecError(f"inference.overlap must be in [0, 1), got {overlap}")
    return InferenceSettings(
        overlap=overlap, gaussian=r.get("gaussian", bool, True), mirror=r.get("mirror", bool, True)
    )


def _lesion_fraction(value: float | None) -> float | None:
    if value is not None and not 0 <= value < 1:
        raise TaskSpecError(f"outputs.min_lesion_fraction must be in [0, 1), got {value}")
    return value


def _lesion_slices(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise TaskSpecError(f"outputs.min_lesion_slices must be at least 1, got {value}")
    return value


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
    spacing = (
        pre.numbers("spacing_mm", 3, float, None) if pre.get("spacing_mm", (list, str), "auto") != "auto" else None
    )
    patch = pre.numbers("patch_size", 3, int, None) if pre.get("patch_size", (list, str), "auto") != "auto" else None
    normalization_text = pre.get("normalization", str, "auto")
    normalization = None if normalization_text == "auto" else pre.choice("normalization", Normalization)
    model_settings = _model(root.section("model"), patch)
    out = root.section("outputs")
    if out._data.get("categories"):
        categories = tuple(
            ClassCategory(c.code("code"), c.get("min_probability", float))  # type: ignore[arg-type]
            for c in out.sections("categories")
        )
    else:
        categories = (
            ClassCategory(CodedTerm.parse("99RADFED:FINDING-UNLIKELY:Finding unlikely"), 0.0),
            ClassCategory(CodedTerm.parse("99RADFED:FINDING-LIKELY:Finding likely"), 0.5),
        )
    try:

        def code(key: str) -> CodedTerm:
            return out.code(key, GENERIC_CODES[key])  # type: ignore[return-value]

        codes = TaskCodes(
            procedure=code("procedure"),
            finding_site=out.code("finding_site", None),
            lesion_label=out.get("lesion_label", str, "Lesion"),
            lesion_category=code("lesion_category"),
            lesion_type=code("lesion_type"),
            lesion_finding_type=code("lesion_finding_type"),
            study_finding_type=code("study_finding_type"),
            probability_concept=code("probability_concept"),
            classification_concept=code("classification_concept"),
            categories=categories,
            no_finding=code("no_finding"),
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
            spacing_mm=(spacing[0], spacing[1], spacing[2]) if spacing else None,
            patch_size=(patch[0], patch[1], patch[2]) if patch else None,
            normalization=normalization,
            percentiles=pre.numbers("percentiles", 2, float, (1.0, 99.0)),
        ),
        model=model_settings,
        training=_training(root._data.get("training") and root.section("training"), len(channels)),
        inference=_inference(root._data.get("inference") and root.section("inference")),
        outputs=Outputs(
            lesion_threshold=out.get("lesion_threshold", float),
            min_lesion_volume_mm3=out.get("min_lesion_volume_mm3", float),
            max_lesions=out.get("max_lesions", int, 20),
            min_lesion_fraction=_lesion_fraction(out.get("min_lesion_fraction", float, None)),
            min_lesion_slices=_lesion_slices(out.get("min_lesion_slices", int, None)),
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
    shipped = resources.files("radfed.inference.model") / "tasks" / f"{path_or_name}.toml"
    if not shipped.is_file():
        available = sorted(
            p.name.removesuffix(".toml")
            for p in (resources.files("radfed.inference.model") / "tasks").iterdir()
            if p.name.endswith(".toml")
        )
        raise TaskSpecError(f"no shipped task spec {path_or_name!r}; shipped: {', '.join(available)}")
    return parse_task_spec(shipped.read_text(), f"radfed:{path_or_name}")
