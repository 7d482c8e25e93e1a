"""Local training: cohort readiness, a verified artifact with torch/ONNX parity, tamper detection."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from radfed.federation.learning.calibration import FRACTIONS, MULTI_SLICE
from radfed.federation.learning.cohort import cohort_from_sources
from radfed.inference.model.artifact import ArtifactError, load_artifact, manifest_digest
from radfed.inference.model.taskspec import TaskSpec, load_task_spec


def test_artifact_is_complete_and_verified(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    assert artifact.identity.name == "prostate-mpmri" and artifact.identity.version == "0.0.1"
    assert artifact.spec.channel_names == ("t2w", "adc", "dwi")
    assert artifact.spec.plan is not None
    assert artifact.inputs[0].shape == (None, 3, *artifact.spec.plan.patch_size)
    provenance = artifact.provenance
    assert provenance["training"] == "local"
    assert provenance["studies_per_site"] == {"local": 6}
    assert provenance["onnx_parity_max_abs_error"] < 1e-3


def test_tampered_model_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    with (copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(copy)


def test_contract_mismatch_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["contract"]["inputs"][0]["shape"][1] = 2
    manifest["manifest_sha256"] = manifest_digest(manifest)  # a consistent manifest, but a wrong contract
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="contract"):
        load_artifact(copy)


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("thresholds", lambda m: m["thresholds"].update(lesion_probability=0.05)),
        ("task spec", lambda m: m.update(task_spec=m["task_spec"].replace("max_lesions = 20", "max_lesions = 2"))),
        ("plan", lambda m: m["plan"].update(batch_size=m["plan"]["batch_size"] + 1)),
        ("harmonisation", lambda m: m.update(harmonisation={"t2w": [0.0] * 11, "adc": [0.0] * 11, "dwi": [0.0] * 11})),
    ],
)
def test_a_manifest_edited_after_export_is_refused(
    tmp_path: Path, tiny_artifact: Path, field: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="changed after export"):
        load_artifact(copy)


def test_a_small_cohort_trains_on_every_study_and_keeps_the_spec_thresholds(tiny_artifact: Path) -> None:
    artifact = load_artifact(tiny_artifact)
    assert artifact.provenance["calibration"] is None and artifact.provenance["validation"] == []
    shipped = load_task_spec().outputs
    assert artifact.spec.outputs.lesion_threshold == shipped.lesion_threshold
    assert artifact.spec.outputs.min_lesion_volume_mm3 == shipped.min_lesion_volume_mm3
    # the share-of-the-largest rule the spec leaves open comes from the training masks
    assert shipped.min_lesion_fraction is None and artifact.spec.outputs.min_lesion_fraction in FRACTIONS
    # and so does the minimum slice extent, stored in the manifest the node reads
    assert shipped.min_lesion_slices is None and artifact.spec.outputs.min_lesion_slices in (1, MULTI_SLICE)


def test_the_thread_setting_is_honoured(tmp_path: Path, synth_root: Path) -> None:
    """``radfed train --threads N`` sets torch's intra-op threads for the training (and OMP for children)."""
    import os

    import torch

    from radfed.federation.learning.train_local import train_local_artifact

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            outcome = train_local_artifact(
                task=None, sources=[str(synth_root / "site-1")], out=tmp_path / str(threads), steps=1, threads=threads
            )
            assert torch.get_num_threads() == threads
            assert os.environ["OMP_NUM_THREADS"] == str(threads)
            assert outcome.artifact.provenance["torch_threads"] == threads
    finally:
        torch.set_num_threads(before)


def test_automatic_threads_take_the_cores_that_are_not_busy() -> None:
    from radfed.federation.learning.train_local import free_cores

    assert free_cores(load=0.3, cpus=2) == 2  # an idle 2-core machine: both
    assert free_cores(load=1.2, cpus=2) == 1  # another training on one of them
    assert free_cores(load=7.5, cpus=2) == 1  # never less than one
    assert free_cores(load=2.0, cpus=16) == 14


def test_bad_studies_are_skipped_with_a_reason(tmp_path: Path, synth_root: Path) -> None:
    site = tmp_path / "site-1"
    shutil.copytree(synth_root / "site-1", site)
    shutil.rmtree(site / "study-0001" / "SEG")  # no reference segmentation
    shutil.rmtree(site / "study-0002" / "DWI")  # a missing series
    cohort = cohort_from_sources(load_task_spec(), [str(site)])
    report = cohort.report
    assert (report.found, report.usable, len(report.rejected)) == (3, 1, 2)
    reasons = " | ".join(r.reason for r in report.rejected)
    assert "reference-seg" in reasons and "no series matched rule dwi" in reasons
    assert set(report.as_metrics()) == {
        "studies_found",
        "studies_usable",
        "studies_rejected",
        "label_positive",
        "label_negative",
        "label_unknown",
    }


def test_cache_is_reused(tmp_path: Path, synth_root: Path) -> None:
    spec = load_task_spec()
    first = cohort_from_sources(spec, [str(synth_root / "site-2")], cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 3
    second = cohort_from_sources(spec, [str(synth_root / "site-2")], cache_dir=tmp_path)
    assert [s.key for s in first.samples] == [s.key for s in second.samples]
    assert all((a.image == b.image).all() for a, b in zip(first.samples, second.samples, strict=True))


def test_cohort_from_an_orthanc_url(orthanc: object, orthanc_client: object, synth_root: Path) -> None:
    """``radfed train --local --data http://user:pw@host:port --labels labels.csv`` reads studies from Orthanc."""
    from radfed.inference.orthanc.client import OrthancClient
    from radfed.inference.testing.orthanc_server import OrthancProcess
    from radfed.inference.testing.synthetic.sites import site_profile
    from radfed.inference.testing.synthetic.writer import iter_site_studies, upload_study

    assert isinstance(orthanc, OrthancProcess) and isinstance(orthanc_client, OrthancClient)
    for study in iter_site_studies(site_profile(1, small=True), 3, seed=4):  # the same studies as synth_root/site-1
        upload_study(study, orthanc_client)
    url = f"http://{orthanc.options.username}:{orthanc.options.password}@127.0.0.1:{orthanc.http_port}"
    from_orthanc = cohort_from_sources(load_task_spec(), [url], labels=synth_root / "site-1" / "labels.csv")
    from_folder = cohort_from_sources(load_task_spec(), [str(synth_root / "site-1")])
    assert from_orthanc.report.usable == 3 and from_orthanc.report.rejected == []
    by_key = {s.key: s for s in from_folder.samples}
    for sample in from_orthanc.samples:
        twin = by_key[sample.key]
        assert sample.label == twin.label
        assert (sample.lesions == twin.lesions).all()
        assert (sample.image == twin.image).all()


@pytest.mark.parametrize("epsilon", [0.0, 8.0])
def test_a_site_continues_its_optimiser_from_its_previous_round(
    tmp_path: Path, synth_root: Path, epsilon: float, planned_spec: TaskSpec
) -> None:
    """Adam's moments (DP-SGD's momentum) carry over between a site's rounds of one job, through a restart
    (they are on disk), and never into another job."""
    import torch

    from radfed.federation.learning.training import model_to_arrays, new_model
    from radfed.federation.site.rounds import RoundPlan, SiteConfig, train_round

    site = SiteConfig(name="hospital-1", data=(str(synth_root / "site-1"),), state_dir=tmp_path / "state")
    assert planned_spec.plan is not None
    config = {"job": "job-a", "local-steps": 2, "num-rounds": 2, "held-out-fraction": 0.25, "epsilon": epsilon}
    config["plan"] = planned_spec.plan.to_json()
    if epsilon:
        config["delta"] = 1e-5
    arrays = model_to_arrays(new_model(planned_spec))
    for server_round in (1, 2):
        arrays, _ = train_round(site, RoundPlan.from_config({**config, "server-round": server_round}), arrays)
        state = torch.load(site.job_dir("job-a") / "optimizer.pt", weights_only=True)
        buffers = state["state"][0]
        assert int(buffers["step"]) == 2 * server_round  # the second round went on from the first
        assert torch.count_nonzero(buffers["exp_avg"]) > 0  # the recipe AdamW (under DP: noised gradients)
    assert not site.job_dir("job-b").exists()
    train_round(site, RoundPlan.from_config({**config, "job": "job-b", "server-round": 1}), arrays)
    fresh = torch.load(site.job_dir("job-b") / "optimizer.pt", weights_only=True)
    assert int(fresh["state"][0]["step"]) == 2  # a new job starts its optimiser afresh


def test_a_new_run_of_a_job_starts_afresh_and_spends_the_same_privacy_budget(
    tmp_path: Path, synth_root: Path, planned_spec: TaskSpec
) -> None:
    """A job run again under its name (a new instance from its coordinator) starts its optimiser afresh, and
    its DP-SGD goes on from the budget the name's earlier runs spent; a resumed run (same instance) keeps its
    optimiser."""
    import torch

    from radfed.federation.learning.privacy import PrivacyBudgetExceededError
    from radfed.federation.learning.training import model_to_arrays, new_model
    from radfed.federation.site.rounds import RoundPlan, SiteConfig, privacy_spent, train_round

    site = SiteConfig(name="hospital-1", data=(str(synth_root / "site-1"),), state_dir=tmp_path / "state")
    assert planned_spec.plan is not None
    # the budget is planned for 3 rounds of 2 steps: the three rounds below use it up
    config = {"job": "job-a", "local-steps": 2, "num-rounds": 3, "held-out-fraction": 0.25, "epsilon": 8.0}
    config |= {"plan": planned_spec.plan.to_json(), "delta": 1e-5}
    arrays = model_to_arrays(new_model(planned_spec))

    def steps_taken(instance: str) -> int:
        state = torch.load(site.run_dir("job-a", instance) / "optimizer.pt", weights_only=True)
        return int(state["state"][0]["step"])

    train_round(site, RoundPlan.from_config({**config, "job-instance": "first", "server-round": 1}), arrays)
    spent_first = privacy_spent(site, "job-a", 1e-5)
    assert steps_taken("first") == 2 and 0 < spent_first <= 8.0
    train_round(site, RoundPlan.from_config({**config, "job-instance": "second", "server-round": 1}), arrays)
    assert steps_taken("second") == 2  # not 4: the earlier run's moments stay with it
    assert privacy_spent(site, "job-a", 1e-5) > spent_first  # the name's budget is one across its runs
    train_round(site, RoundPlan.from_config({**config, "job-instance": "first", "server-round": 2}), arrays)
    assert steps_taken("first") == 4  # the first run, resumed, goes on from its own state
    with pytest.raises(PrivacyBudgetExceededError, match="kept under its name"):
        train_round(site, RoundPlan.from_config({**config, "job-instance": "third", "server-round": 1}), arrays)


def test_a_seed_fixes_the_initial_weights_whatever_ran_before(planned_spec: TaskSpec) -> None:
    import torch

    from radfed.federation.learning.training import new_model

    spec = planned_spec
    first = new_model(spec, seed=3).state_dict()
    torch.rand(1000)  # other code drawing from torch's global generator in between
    again = new_model(spec, seed=3).state_dict()
    other = new_model(spec, seed=4).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].dtype.is_floating_point)
    state = torch.random.get_rng_state()
    new_model(spec, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator is left as it was
