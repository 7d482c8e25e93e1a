"""Model quality on real data, by patient-level k-fold: the planned default recipe beside the first wave's
default, in one run, on the same folds.

Data: ``../shared/data/brain_tumor_progression`` (22 real post-contrast T1 brain MRIs of 11 glioblastoma
patients with expert tumour masks, TCIA "Brain-Tumor-Progression"; both scans of a patient stay in one fold),
read through radfed's MSD / nnU-Net raw dataset reader, and synthetic prostate mp-MRI sites (radfed synth).
A reference lesion is a component of the expert mask of at least the task's minimum lesion volume (smaller
specks count in Dice, not as lesions to find); planned rows also show postprocessing / TTA variants of the same model.

    python -m bench quality
    RADFED_BENCH_QUALITY_STEPS=300 RADFED_BENCH_QUALITY_SETS=brain python -m bench quality   # shorter
    RADFED_BENCH_QUALITY_MINUTES=60 ...   # each training's time limit (default: the recipe's, 40 min)
    RADFED_BENCH_QUALITY_SEED=1 ...       # another draw of initial weights and patches (same folds)
    RADFED_BENCH_QUALITY_PASTE=1.0 ...    # the lesion-paste arm's share of patches (default 0.5)
    RADFED_BENCH_QUALITY_LOCAL_STEPS=25 ... # the federated arms' local steps per round (default 50)
    RADFED_BENCH_QUALITY_SERVER_LR=2 ...  # the federated arms' server step (default: the job's, 1)
    RADFED_BENCH_QUALITY_SERVER_OPTIMIZER=adam RADFED_BENCH_QUALITY_SERVER_LR=0.003 ...  # FedAdam (or yogi)
    RADFED_BENCH_QUALITY_FOLDS=0 ...      # only these folds (default all)
    RADFED_BENCH_QUALITY_K=5 ...          # brain: patient-level folds (default 3; prostate: its 3 sites)
    RADFED_BENCH_QUALITY_BUDGET=per-site ... # each federated site takes all the steps (default: the sites together)
    RADFED_BENCH_QUALITY_FEDERATED_LR=2e-3 ... # the federated arms' learning rate at the sites (default: the recipe's)
    RADFED_BENCH_QUALITY_SITE_OPTIMIZER=reset ... # the sites start each round with a fresh optimiser (default: carry)

Without RADFED_BENCH_QUALITY_STEPS the planned recipe takes as many steps as its time limit allows, as
``radfed train --local`` does; folds side by side share the cores, so say how many ran at once.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shlex
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.report import table

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ROOT.parent / "shared" / "data" / "brain_tumor_progression"
# the brain set's patient-level folds (3 since session 9; nnU-Net cross-validates with 5); the prostate sites are 3
FOLDS = int(os.environ.get("RADFED_BENCH_QUALITY_K", "3"))
PROSTATE_SITES = 3
# the folds to run (all by default; a subset for a quick look, whose means are then not the benchmark's)
RUN_FOLDS = [int(f) for f in os.environ.get("RADFED_BENCH_QUALITY_FOLDS", ",".join(map(str, range(FOLDS)))).split(",")]
STEPS = int(os.environ["RADFED_BENCH_QUALITY_STEPS"]) if os.environ.get("RADFED_BENCH_QUALITY_STEPS") else None
MINUTES = float(os.environ["RADFED_BENCH_QUALITY_MINUTES"]) if os.environ.get("RADFED_BENCH_QUALITY_MINUTES") else None
FEDERATED_STEPS = 1500  # the federated arm's whole budget when STEPS is not set (rounds need a count)
SETS = os.environ.get("RADFED_BENCH_QUALITY_SETS", "brain,prostate").split(",")
# Training seeds are the fold numbers plus 100 x this (another draw of initial weights and patches; same folds).
SEED = int(os.environ.get("RADFED_BENCH_QUALITY_SEED", "0"))
# and "federated" (brain), "session-10-plan" (brain: the planned recipe on session 10's 2-D plan, 128 x 128 patches
# at batch 8, against today's whole slices at batch 2), "2.5-d" (brain: the planned recipe with one slice either
# side as input channels, [model] context_slices = 1), "voxel" (brain and prostate: the planned recipe with forced
# patches centred on any lesion voxel, the default before session 18: [training] foreground_sampling = "voxel"),
# "ensemble" (brain and prostate: the planned recipe with [model] ensemble = RADFED_BENCH_QUALITY_ENSEMBLE networks,
# default 2, each on a share of the training process's threads; also scores its first network alone, which is the
# planned arm's model: the same seed), "cpu-bf16" (brain and prostate: the planned recipe with bfloat16 autocast on
# a CPU with native bf16, [training] cpu_mixed_precision = true, against the default's float32), "patch-dice"
# (brain and prostate: the planned recipe with a Dice per patch holding lesion voxels, [training] dice_over = "patch",
# against the default's one Dice over the batch), "no-paste" (brain and prostate: the planned recipe without lesion
# pasting, [training] lesion_paste = 0, the default before session 24), "lesion-paste" (brain and prostate: the
# planned recipe with [training] lesion_paste = RADFED_BENCH_QUALITY_PASTE, default 0.5: the default's own value),
# "federated-no-paste" (brain: the federated arm without lesion pasting), "sgd" (brain and prostate: the planned
# recipe with nnU-Net's optimiser, SGD with Nesterov momentum 0.99 at 0.01 and poly decay, against AdamW + cosine),
# "nnunet-spatial" (brain and prostate: nnU-Net's spatial ranges, in-plane rotation up to 180 degrees, as nnU-Net
# uses for square 2-D patches, and scaling 0.7-1.4, against 15 degrees and 0.85-1.25), "strong-aug" (brain and
# prostate: every augmentation twice as often, [training] augmentation_probability = 0.4, against 0.2),
# "paste-forced" (brain and prostate: lesions pasted only into the patches forced onto foreground, in place of a
# cut around the study's own lesion, [training] paste_into = "forced", against pasting into any patch), "local"
# (brain: the planned recipe trained on the first of the federated arm's SITES hospitals alone, its own 1/SITES of
# the fold's training patients: what a hospital reaches without the federation, and a point on the learning curve),
# "residual" (brain and prostate: the planned DynUNet with residual blocks, [model] residual = true, after nnU-Net's
# residual encoder presets), "segresnet" (brain and prostate: MONAI's SegResNet on the planned grid and patch),
# "lr-2e-3" and "lr-4e-3" (brain and prostate: the planned recipe at that AdamW learning rate, against 1e-3)
ARMS = os.environ.get("RADFED_BENCH_QUALITY_ARMS", "planned,first-wave").split(",")
# the "lesion-paste" arm's share of patches (CarveMix doubled its training sets with mixes)
LESION_PASTE = float(os.environ.get("RADFED_BENCH_QUALITY_PASTE", "0.5"))
ENSEMBLE = int(os.environ.get("RADFED_BENCH_QUALITY_ENSEMBLE", "2"))  # the "ensemble" arm's networks
SESSION_10_PLAN = "[preprocessing]\npatch_size = [1, 128, 128]\n\n[model]\nbatch_size = 8\n"
SGD = '\n[training]\noptimizer = "sgd"\nlearning_rate = 0.01\nschedule = "poly"\n'  # the "sgd" arm (nnU-Net's)
NNUNET_SPATIAL = "\n[training]\nrotation_deg = 180.0\nscale_range = [0.7, 1.4]\n"  # the "nnunet-spatial" arm
STRONG_AUG = "\n[training]\naugmentation_probability = 0.4\n"  # the "strong-aug" arm
# the arms that only add [training] keys to the planned recipe
PASTE_FORCED = '\n[training]\npaste_into = "forced"\n'  # the "paste-forced" arm
# the arms that only add [model] keys to the planned recipe
MODEL_ARMS = {"residual": "[model]\nresidual = true\n", "segresnet": '[model]\narchitecture = "segresnet"\n'}
TRAINING_ARMS = {
    "sgd": SGD,
    "nnunet-spatial": NNUNET_SPATIAL,
    "strong-aug": STRONG_AUG,
    "paste-forced": PASTE_FORCED,
    # the planned recipe at twice and four times its AdamW learning rate (1e-3): the centralised control for the
    # federated arms' site rates (RADFED_BENCH_QUALITY_FEDERATED_LR)
    "lr-2e-3": "\n[training]\nlearning_rate = 0.002\n",
    "lr-4e-3": "\n[training]\nlearning_rate = 0.004\n",
}
# The planned model's probability map cut at other thresholds than the spec's (the brain folds are too
# small for a validation split, so nothing calibrates it there): an analysis row, not a recipe.
VARIANT_THRESHOLDS = (0.3, 0.4)
SITES = int(os.environ.get("RADFED_BENCH_QUALITY_SITES", "2"))  # the federated arm's hospitals
# per round; rounds = steps / (local steps x sites): the centralised step budget
FEDERATED_LOCAL_STEPS = int(os.environ.get("RADFED_BENCH_QUALITY_LOCAL_STEPS", "50"))
# "total" (default): the sites' steps add up to the centralised arm's, so each site takes 1/SITES of them and the
# global model 1/SITES as many sequential steps; "per-site": each site takes the centralised arm's steps (hospitals
# train side by side on their own machines: the same wall-clock time as the centralised run, SITES times the compute)
BUDGET = os.environ.get("RADFED_BENCH_QUALITY_BUDGET", "total")
if BUDGET not in ("total", "per-site"):
    raise SystemExit(f"RADFED_BENCH_QUALITY_BUDGET must be total or per-site, not {BUDGET!r}")
# the federated arms' learning rate at the sites (unset: the recipe's; run-config learning-rate)
_SITE_LR = os.environ.get("RADFED_BENCH_QUALITY_FEDERATED_LR")
FEDERATED_LEARNING_RATE = float(_SITE_LR) if _SITE_LR else None
# carry (default, as the job does): each site's AdamW moments carry over to its next round; reset: a fresh optimiser
SITE_OPTIMIZER = os.environ.get("RADFED_BENCH_QUALITY_SITE_OPTIMIZER", "carry")
if SITE_OPTIMIZER not in ("carry", "reset"):
    raise SystemExit(f"RADFED_BENCH_QUALITY_SITE_OPTIMIZER must be carry or reset, not {SITE_OPTIMIZER!r}")
# the coordinator's rule (run-config server-optimizer: sgd, the default, | adam | yogi)
SERVER_OPTIMIZER = os.environ.get("RADFED_BENCH_QUALITY_SERVER_OPTIMIZER", "sgd")
# the coordinator's step on the sites' mean update (unset: the job's default, 1: plain FedAvg)
SERVER_LEARNING_RATE = (
    float(os.environ["RADFED_BENCH_QUALITY_SERVER_LR"]) if os.environ.get("RADFED_BENCH_QUALITY_SERVER_LR") else None
)

# Published reference figures (README): a 2-D U-Net on single-sequence glioma MRI reaches mean Dice ~0.8
# (Buda et al., Computers in Biology and Medicine 2019: 0.82 on FLAIR of 110 lower-grade glioma patients).
PUBLISHED = {"brain": "~0.82 (2-D U-Net, LGG FLAIR, Buda 2019)", "prostate": "n/a (synthetic)"}

# One channel of a T1 brain MRI; everything else is the planned default.
BRAIN_SPEC = """
[task]
name = "brain-tumour-t1"
title = "Brain tumour segmentation on post-contrast T1"

[[channels]]
name = "t1"
reference = true
modality = "MR"
description_regex = '(?i)t1'

[labels.segmentation]
lesion_property_types = ["SCT:108369006"]

[labels.classification]
source = "csv"
key = "StudyInstanceUID"
column = "label"
positive_values = ["1"]

[preprocessing]

[model]

[outputs]
lesion_threshold = 0.5
min_lesion_volume_mm3 = 10.0
"""

# The first wave's default, as data: the compact 3-D U-Net, BCE weighted 10x on lesion voxels + Dice, 60 %
# lesion-centred crops jittered +-8 voxels, left-right flips only, Adam at 0.01, no validation or calibration.
FIRST_WAVE = """
[preprocessing]
patch_size = [16, 64, 64]
normalization = "percentile"

[model]
architecture = "unet3d"
features = [8, 16, 32]
groups = 4
norm = "group"
batch_size = 4

[training]
steps = 1500
optimizer = "adam"
learning_rate = 0.01
schedule = "constant"
weight_decay = 0.0
ce_positive_weight = 10.0
foreground_fraction = 0.6
foreground_jitter = 0.25
augmentations = ["flip"]
lesion_paste = 0.0
validation_fraction = 0.0
calibrate = false
"""


def _first_wave(spec_text: str, spacing: str) -> str:
    """A spec with its [preprocessing] and [model] replaced by the first wave's."""
    head = spec_text.split("[preprocessing]")[0]
    tail = spec_text.split("[outputs]")[1]
    first = FIRST_WAVE.replace("[preprocessing]\n", f"[preprocessing]\nspacing_mm = {spacing}\n")
    return head + first + "\n[outputs]" + tail


@dataclass(frozen=True)
class Job:
    dataset: str
    arm: str
    fold: int
    spec_text: str
    sources: tuple[str, ...]
    test_keys: tuple[str, ...]  # study keys of this fold's test studies
    cache: str
    site_keys: tuple[tuple[str, ...], ...] = ()  # the federated arm: training studies of each simulated site
    study_names: tuple[tuple[str, str], ...] = ()  # study key -> case name, for the per-study table


def _brain_dataset(work: Path) -> tuple[Path, dict[str, int]]:
    """The brain set as an nnU-Net raw dataset (links, no copies); returns case -> patient."""
    root = work / "brain"
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    patients = {}
    for folder in sorted(p for p in BRAIN.iterdir() if p.is_dir()):
        for when in ("Pre", "Post"):
            case = f"brain_{folder.name}_{when.lower()}"
            for link, target in (
                (root / "imagesTr" / f"{case}_0000.nii.gz", folder / f"{when}_Scan_T1.nii.gz"),
                (root / "labelsTr" / f"{case}.nii.gz", folder / f"{when}_Mask.nii.gz"),
            ):
                if not link.exists():
                    link.symlink_to(target)
            patients[case] = int(folder.name)
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz"})
    )
    return root, patients


def _jobs(work: Path) -> list[Job]:
    from radfed.federation.learning.cohort import study_key

    jobs = []
    if "brain" in SETS and BRAIN.is_dir():
        root, patients = _brain_dataset(work)
        names = tuple((study_key(f"brain/{c}"), c.removeprefix("brain_")) for c in patients)
        for fold in RUN_FOLDS:
            test = tuple(study_key(f"brain/{c}") for c, p in patients.items() if (p - 1) % FOLDS == fold)
            # the federated arm: the fold's training patients dealt in turn to SITES hospitals
            training = sorted({p for p in patients.values() if (p - 1) % FOLDS != fold})
            sites = tuple(
                tuple(study_key(f"brain/{c}") for c, p in patients.items() if p in training[i::SITES])
                for i in range(SITES)
            )
            for arm in ARMS:
                text = _first_wave(BRAIN_SPEC, "[1.0, 1.0, 1.0]") if arm == "first-wave" else BRAIN_SPEC
                if arm == "session-10-plan":
                    text = text.replace("[preprocessing]\n\n[model]\n", SESSION_10_PLAN)
                if arm == "2.5-d":
                    text = text.replace("[model]\n", "[model]\ncontext_slices = 1\n")
                if arm in MODEL_ARMS:
                    text = text.replace("[model]\n", MODEL_ARMS[arm], 1)
                if arm == "voxel":
                    text += '\n[training]\nforeground_sampling = "voxel"\n'
                if arm == "ensemble":
                    text = text.replace("[model]\n", f"[model]\nensemble = {ENSEMBLE}\n")
                if arm == "cpu-bf16":
                    text += "\n[training]\ncpu_mixed_precision = true\n"
                if arm == "patch-dice":
                    text += '\n[training]\ndice_over = "patch"\n'
                if arm == "lesion-paste":
                    text += f"\n[training]\nlesion_paste = {LESION_PASTE}\n"
                if arm in ("no-paste", "federated-no-paste"):
                    text += "\n[training]\nlesion_paste = 0.0\n"
                text += TRAINING_ARMS.get(arm, "")
                jobs.append(Job("brain", arm, fold, text, (str(root),), test, str(work / "cache"), sites, names))
    if "prostate" in SETS:
        from radfed.inference.model.taskspec import load_task_spec
        from radfed.inference.testing.synthetic.writer import synthesize_to_folder

        synthesize_to_folder(work / "prostate", sites=PROSTATE_SITES, studies_per_site=12, seed=11, small=True)
        shipped = load_task_spec(None).source_text
        # the sites are the folds: test on one, train on the others
        for fold in (f for f in RUN_FOLDS if f < PROSTATE_SITES):
            site = f"site-{fold + 1}"
            train = tuple(str(p) for p in sorted((work / "prostate").glob("site-*")) if p.name != site)
            for arm in ARMS:
                text = _first_wave(shipped, "[3.0, 1.0, 1.0]") if arm == "first-wave" else shipped
                if arm == "voxel":
                    text = text.replace("[training]\n", '[training]\nforeground_sampling = "voxel"\n', 1)
                if arm == "ensemble":
                    text = text.replace("[model]\n", f"[model]\nensemble = {ENSEMBLE}\n", 1)
                if arm == "segresnet":  # the shipped spec names its architecture
                    text = text.replace('architecture = "dynunet"', 'architecture = "segresnet"', 1)
                elif arm in MODEL_ARMS:
                    text = text.replace("[model]\n", MODEL_ARMS[arm], 1)
                if arm == "cpu-bf16":
                    text = text.replace("[training]\n", "[training]\ncpu_mixed_precision = true\n", 1)
                if arm == "patch-dice":
                    text = text.replace("[training]\n", '[training]\ndice_over = "patch"\n', 1)
                if arm == "lesion-paste":
                    text = text.replace("[training]\n", f"[training]\nlesion_paste = {LESION_PASTE}\n", 1)
                if arm == "no-paste":
                    text = text.replace("[training]\n", "[training]\nlesion_paste = 0.0\n", 1)
                if arm in TRAINING_ARMS:
                    text = text.replace("[training]\n", TRAINING_ARMS[arm].lstrip("\n"), 1)
                jobs.append(Job("prostate", arm, fold, text, (*train, str(work / "prostate" / site)), (site,),
                                str(work / "cache")))  # fmt: skip
    return jobs


def _run(job: Job) -> list[dict[str, Any]]:
    from radfed.federation.learning.calibration import reference_fraction
    from radfed.federation.learning.train_local import fit, set_threads

    set_threads(1)  # one torch thread per process, processes side by side on the cores
    from radfed.federation.learning.cohort import SiteCohort, cohort_from_sources
    from radfed.inference.model.taskspec import parse_task_spec

    spec = parse_task_spec(job.spec_text, f"{job.dataset}/{job.arm}")
    if MINUTES is not None:
        spec = replace(spec, training=replace(spec.training, time_limit_minutes=MINUTES))
    if job.dataset == "prostate":
        test_site = job.test_keys[0]
        train_cohort = cohort_from_sources(spec, [s for s in job.sources if not s.endswith(test_site)])
        test_cohort = SiteCohort(train_cohort.spec)
        test_cohort.add_folder(Path(next(s for s in job.sources if s.endswith(test_site))))
        train, test = train_cohort.samples, test_cohort.samples
        spec = train_cohort.spec
    else:
        cohort = cohort_from_sources(spec, job.sources)
        train = [s for s in cohort.samples if s.key not in job.test_keys]
        if job.arm == "local":  # hospital 1 alone (the fold's plan: the same grid and patch)
            train = [s for s in train if s.key in job.site_keys[0]]
        test = [s for s in cohort.samples if s.key in job.test_keys]
        # the plan must see only the training folds: derive it again from them
        from radfed.inference.model.plan import DatasetFingerprint, derive_plan

        prints = [e.fingerprint for e in cohort.entries if e.key not in job.test_keys and e.fingerprint]
        spec = cohort.spec
        if spec.preprocessing.patch_size is None:
            spec = spec.planned(derive_plan(spec.plan_overrides(), DatasetFingerprint.from_studies(prints)))
            if spec.spacing_mm != cohort.spec.spacing_mm:
                raise RuntimeError("the training folds alone plan another grid than the whole set: rebuild needed")

    def progress(step: int, total: int, loss: float) -> None:
        if step % 250 == 0 or step == total:
            print(f"  {job.dataset} {job.arm} fold {job.fold}: step {step}/{total}, loss {loss:.3f}", flush=True)

    if job.arm.startswith("federated"):
        return [_federated(job, spec, train, test)]
    trained = fit(spec, train, seed=job.fold + 100 * SEED, steps=STEPS, progress=progress)
    # Postprocessing and test-time variants of the same trained model (free of training noise).
    variants = {job.arm: trained.spec}
    models: dict[str, Any] = {job.arm: trained.model}
    if job.arm == "ensemble":  # its first network alone is the planned arm's model (same seed)
        variants["ensemble's first network alone"] = trained.spec
        ensemble: Any = trained.model  # a networks.Ensemble: torch types its members as a Tensor or Module
        models["ensemble's first network alone"] = ensemble.members[0]
    unprotected = "planned, share rule without protecting large components (session 9)"
    if job.arm == "planned":
        variants["planned, no share-of-largest rule"] = trained.spec.with_outputs(min_lesion_fraction=0.0)
        variants["planned, no minimum slice extent"] = trained.spec.with_outputs(min_lesion_slices=1)
        variants["planned, no mirroring TTA"] = replace(
            trained.spec, inference=replace(trained.spec.inference, mirror=False)
        )
        for threshold in VARIANT_THRESHOLDS:  # what calibration could buy where no validation split is left
            variants[f"planned, lesion threshold {threshold:g}"] = trained.spec.with_outputs(lesion_threshold=threshold)
        if trained.calibration is None and spec.outputs.min_lesion_fraction is None:
            with _share_rule_unprotected():
                share = reference_fraction(train, spec.outputs.min_lesion_volume_mm3)
            variants[unprotected] = trained.spec.with_outputs(min_lesion_fraction=share)
    rows = []
    for name, variant in variants.items():
        with _share_rule_unprotected() if name == unprotected else nullcontext():
            counts, studies = _evaluate(models.get(name, trained.model), test, variant, dict(job.study_names))
        summary = counts.summary()
        rows.append(
            {
                "dataset": job.dataset,
                "arm": name,
                "fold": job.fold,
                "train": trained.training_studies,
                "test": len(test),
                "steps": trained.log.steps,
                "seconds_per_step": trained.log.seconds / max(trained.log.steps, 1),
                "min_lesion_fraction": variant.outputs.lesion_fraction,
                "min_lesion_slices": variant.outputs.lesion_slices,
                "plan": trained.spec.plan.reasons[-1] if trained.spec.plan else "",
                **summary,
                "studies": studies,
            }
        )
    return rows


def _evaluate(model: Any, test: list[Any], spec: Any, names: dict[str, str]) -> tuple[Any, list[dict[str, Any]]]:
    """The evaluation counts over the test studies, and each study's reference volume, Dice and false
    positives (the fold mean hides that small lesions decide it)."""
    from radfed.federation.learning.evaluation import EvaluationCounts, predict_samples, study_counts

    total, studies = EvaluationCounts(), []
    for sample, prediction in zip(test, predict_samples(model, test, spec), strict=True):
        counts = study_counts(prediction.probability, prediction.study_score(spec.outputs.study_score), sample, spec)
        total = total + counts
        studies.append(
            {
                "study": names.get(sample.key, sample.key[:8]),
                "reference_ml": counts.reference_voxels * sample.voxel_mm3 / 1000,
                "dice": counts.dice_sum if counts.dice_studies else None,
                "fp": counts.false_positive_components,
            }
        )
    return total, studies


def _per_study_table(results: list[dict[str, Any]], reproduce: str) -> None:
    """Brain: each held-out study's Dice and false positives under each recipe of the run, smallest reference
    volume first."""
    brain_arms = {r["arm"] for r in results if r["dataset"] == "brain"}
    arms = [
        a
        for a in (
            "planned",
            *(f"planned, lesion threshold {t:g}" for t in VARIANT_THRESHOLDS),
            "local",
            "nnunet-spatial",
            "strong-aug",
            "lr-2e-3",
            "lr-4e-3",
            "cpu-bf16",
            "patch-dice",
            "lesion-paste",
            "no-paste",
            "paste-forced",
            "sgd",
            "ensemble",
            "ensemble's first network alone",
            "2.5-d",
            "session-10-plan",
            "first-wave",
        )
        if a in brain_arms
    ]
    by_study: dict[str, dict[str, Any]] = {}
    for row in results:
        if row["dataset"] == "brain" and row["arm"] in arms:
            for study in row.get("studies", ()):
                by_study.setdefault(study["study"], {"volume": study["reference_ml"]})[row["arm"]] = study
    if not by_study:
        return
    rows = []
    for name, entry in sorted(by_study.items(), key=lambda item: item[1]["volume"]):
        cells = [name, f"{entry['volume']:.2f}"]
        for arm in arms:
            study = entry.get(arm)
            dice = study["dice"] if study else None
            cells += [f"{dice:.2f}" if dice is not None else "-", str(study["fp"]) if study else "-"]
        rows.append(cells)
    header = ["study", "reference (mL at the set's 1 mm dummy spacing)"]
    for arm in arms:
        header += [f"Dice, {arm}", f"FP, {arm}"]
    table("Brain set per held-out study, smallest tumour first", header, rows, reproduce)


@contextmanager
def _share_rule_unprotected() -> Iterator[None]:
    """The share-of-largest rule as session 9 shipped it: any component under the share dropped, however large
    (for one side-by-side row; the rule now keeps components of several minimum volumes)."""
    from radfed.inference.pipeline import lesions

    saved = lesions.SHARE_PROTECTED_VOLUMES
    lesions.SHARE_PROTECTED_VOLUMES = math.inf
    try:
        yield
    finally:
        lesions.SHARE_PROTECTED_VOLUMES = saved


def _federated(job: Job, spec: Any, train: list[Any], test: list[Any]) -> dict[str, Any]:
    """The same fold trained by FedAvg over SITES simulated hospitals (no DP), as many steps in all as the
    centralised arm (or as many at each site: BUDGET), the job's own site training and aggregation code
    (federation/lab/experiments.py)."""
    import time

    from radfed.federation.lab.experiments import Arm, Budget, Experiment
    from radfed.federation.learning.aggregation import ServerRule
    from radfed.federation.learning.calibration import reference_fraction, reference_slices

    sites = {f"site-{i + 1}": [s for s in train if s.key in keys] for i, keys in enumerate(job.site_keys)}
    # the share-of-largest rule and the minimum slice extent from the sites' reference masks, as the coordinator
    # pools them (aggregates: kept-volume fractions and extents; pooled exactly, so the union's figures)
    volume = spec.outputs.min_lesion_volume_mm3
    spec = spec.with_outputs(
        min_lesion_fraction=reference_fraction(train, volume), min_lesion_slices=reference_slices(train, volume)
    )
    per_site = (STEPS or FEDERATED_STEPS) // (len(sites) if BUDGET == "total" else 1)
    rounds = max(1, per_site // FEDERATED_LOCAL_STEPS)
    budget = Budget(rounds=rounds, local_steps=FEDERATED_LOCAL_STEPS, seed=job.fold + 100 * SEED, every_round=False)
    arm = Arm(
        job.arm,
        harmonise=False,
        carry_optimizer_state=SITE_OPTIMIZER == "carry",
        server_rule=ServerRule(SERVER_OPTIMIZER),
    )
    if SERVER_LEARNING_RATE is not None:
        arm = replace(arm, server_learning_rate=SERVER_LEARNING_RATE)
    if FEDERATED_LEARNING_RATE is not None:
        arm = replace(arm, learning_rate=FEDERATED_LEARNING_RATE)
    started = time.perf_counter()
    result = Experiment(spec, {}, budget).federate(
        arm, sites, test, lambda line: print(f"  brain fold {job.fold} {job.arm}: {line}")
    )
    seconds = time.perf_counter() - started
    return {
        "dataset": job.dataset,
        "arm": f"{job.arm}, {len(sites)} sites x {rounds} rounds x {FEDERATED_LOCAL_STEPS} steps, "
        + ("" if arm.server_rule == "sgd" else f"{arm.server_rule} ")
        + f"server step {arm.server_learning_rate:g}"
        + (f", site learning rate {arm.learning_rate:g}" if arm.learning_rate is not None else "")
        + ("" if arm.carry_optimizer_state else ", fresh site optimiser each round")
        + " (no DP)",
        "fold": job.fold,
        "train": len(train),
        "test": len(test),
        "steps": rounds * FEDERATED_LOCAL_STEPS * len(sites),
        "seconds_per_step": seconds / (rounds * FEDERATED_LOCAL_STEPS * len(sites)),
        "min_lesion_fraction": spec.outputs.lesion_fraction,
        "min_lesion_slices": spec.outputs.lesion_slices,
        "plan": spec.plan.reasons[-1] if spec.plan else "",
        **result.pooled,
    }


def _mean(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="radfed-quality-") as tmp:
        jobs = _jobs(Path(tmp))
        workers = int(os.environ.get("RADFED_BENCH_JOBS", max(1, min(len(jobs), os.cpu_count() or 1))))
        budget = f"{STEPS} steps" if STEPS else f"as many steps as {MINUTES or 'the recipe'} minutes allow"
        print(f"bench quality: {len(jobs)} trainings ({budget} each), {workers} side by side", flush=True)
        context = multiprocessing.get_context("spawn")
        results: list[dict[str, Any]] = []
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for rows in pool.map(_run, jobs):  # each fold's rows as soon as it and those before it are done
                for row in rows:
                    print(json.dumps({k: v for k, v in row.items() if k != "studies"}), flush=True)
                results += rows
    summary: list[list[object]] = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for arm in dict.fromkeys(r["arm"] for r in results):
            mine = [r for r in results if r["dataset"] == dataset and r["arm"] == arm]
            if not mine:
                continue
            summary.append(
                [
                    dataset,
                    arm,
                    f"{len(mine)} folds, {sum(r['test'] for r in mine)} test",
                    _mean(mine, "dice"),
                    _mean(mine, "lesion_sensitivity"),
                    _mean(mine, "fp_components_per_study"),
                    _mean(mine, "volume_ratio"),
                    _mean(mine, "auc"),
                    _mean(mine, "calibrated_dice"),
                    f"{sum(r['steps'] for r in mine) / len(mine):.0f}",
                    f"{sum(r['seconds_per_step'] for r in mine) / len(mine):.2f}",
                    PUBLISHED[dataset],
                ]
            )
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k.startswith("RADFED_BENCH_QUALITY"))
    reproduce = f"{env + ' ' if env else ''}python -m bench quality"
    table(
        f"Segmentation quality, cross-validation: brain by patient ({FOLDS} folds), prostate by hospital (train on "
        f"two, test on the third); {STEPS or 'time-limited'} training steps per fold "
        f"({os.environ.get('RADFED_BENCH_JOBS', 'all')} folds side by side); mean (min-max) over folds",
        [
            "data",
            "recipe",
            "studies",
            "mean Dice",
            "lesion sens.",
            "FP comp./study",
            "pred/true vol",
            "AUC",
            "calibrated Dice (federated)",
            "steps",
            "s/step",
            "published",
        ],
        summary,
        reproduce,
    )
    _per_study_table(results, reproduce)
