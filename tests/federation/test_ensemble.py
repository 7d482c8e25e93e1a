"""An ensemble (``[model] ensemble = N``): networks trained side by side from other seeds, their probabilities
averaged in one exported model that the node runs as it runs one network."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from radfed.federation.coordinator.server_app import one_network
from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.export import PARITY_TOLERANCE, export_artifact, export_onnx, parity_error
from radfed.federation.learning.networks import Ensemble
from radfed.federation.learning.train_local import fit
from radfed.federation.learning.training import new_model
from radfed.inference.model.artifact import load_artifact
from radfed.inference.model.runtime import OnnxModel
from radfed.inference.model.taskspec import TaskSpec, TaskSpecError, load_task_spec, parse_task_spec
from radfed.inference.pipeline.findings import ModelIdentity
from tests.small_model import small_spec


def _spec(members: int) -> TaskSpec:
    spec = small_spec()
    training = replace(spec.training, augmentations=(), warmup_steps=0, time_limit_minutes=0)
    return replace(spec, model=replace(spec.model, ensemble=members), training=training)


def _samples() -> list[TrainingSample]:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(3):
        lesions = np.zeros((4, 40, 40), np.uint8)
        lesions[1:3, 8 + index : 20, 10:22] = 1
        image = (rng.normal(size=(3, 4, 40, 40)) + 2 * lesions).astype(np.float16)
        samples.append(TrainingSample(f"s{index}", image, lesions, 1, voxel_mm3=3.0))
    return samples


def test_the_output_is_the_logit_of_the_members_mean_probability_and_exports_with_parity(tmp_path: Path) -> None:
    spec = _spec(2)
    members = [new_model(spec, seed=0).eval(), new_model(spec, seed=1).eval()]
    ensemble = Ensemble(members).eval()
    x = torch.randn(2, len(spec.channels), *spec.patch_size)
    with torch.no_grad():
        seg, cls = ensemble(x)
        alone = [m(x) for m in members]
    for index, output in enumerate((seg, cls)):
        expected = (torch.sigmoid(alone[0][index]) + torch.sigmoid(alone[1][index])) / 2
        assert torch.allclose(torch.sigmoid(output), expected, atol=1e-6)
        assert not torch.allclose(output, alone[0][index], atol=1e-3)  # not one member's output
    export_onnx(ensemble, spec, tmp_path / "model.onnx")
    assert parity_error(ensemble, spec, tmp_path / "model.onnx") < PARITY_TOLERANCE


def test_fit_trains_the_members_apart_and_the_first_is_the_one_network_recipes_model(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both fits train each network on one thread, so the first ones match exactly
    try:
        one = fit(_spec(1), _samples(), seed=5, steps=3)
        two = fit(_spec(2), _samples(), seed=5, steps=3)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(two.model, Ensemble) and len(two.model.members) == 2
    assert [log.steps for log in two.member_logs] == [3, 3] and two.log is two.member_logs[0]
    first, second = (m.state_dict() for m in two.model.members)
    assert all(torch.allclose(first[k], v, atol=1e-6) for k, v in one.model.state_dict().items())
    assert not all(torch.allclose(first[k], second[k]) for k in first)  # another seed, another network
    artifact = export_artifact(two.model, two.spec, tmp_path / "artifact", ModelIdentity("ensemble", "0.0.1"))
    loaded = load_artifact(artifact.folder)
    x = np.random.default_rng(1).normal(size=(1, len(loaded.spec.channels), *loaded.spec.patch_size))
    seg, cls = OnnxModel(loaded).run_batch(x.astype(np.float32))
    with torch.no_grad():
        expected_seg, expected_cls = two.model(torch.from_numpy(x.astype(np.float32)))
    assert np.allclose(seg, expected_seg.numpy(), atol=1e-4) and np.allclose(cls, expected_cls.numpy(), atol=1e-4)


def test_the_spec_bounds_the_ensemble_and_a_federated_job_refuses_one() -> None:
    text = load_task_spec().source_text
    assert parse_task_spec(text, "t").model.ensemble == 1
    two = parse_task_spec(text.replace("[model]\n", "[model]\nensemble = 2\n", 1), "t")
    assert two.model.ensemble == 2
    for wrong in (0, 9):
        with pytest.raises(TaskSpecError, match="ensemble"):
            parse_task_spec(text.replace("[model]\n", f"[model]\nensemble = {wrong}\n", 1), "t")
    with pytest.raises(TaskSpecError, match="a federated job trains one network"):
        one_network(two)
    assert one_network(parse_task_spec(text, "t")).model.ensemble == 1
