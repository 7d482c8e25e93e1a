"""A site's evaluation passes (the incoming global model each round, the final model) take their turns on the
node's device as training steps do: while a clinical job holds it, they wait (issue 22: clinical work first)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.evaluation import evaluate_model
from radfed.federation.learning.networks import build_network
from radfed.inference.model.arbiter import DeviceArbiter
from tests.small_model import small_spec


def test_evaluation_waits_while_a_clinical_job_holds_the_device(tmp_path: Path) -> None:
    spec = small_spec()
    spec = replace(spec, inference=replace(spec.inference, mirror=False))
    assert spec.plan is not None
    model = build_network(spec.plan.network, len(spec.channels))
    lesions = np.zeros((4, 48, 48), np.uint8)
    lesions[1:3, 10:20, 10:20] = 1
    image = np.random.default_rng(0).normal(size=(3, 4, 48, 48)).astype(np.float16)
    sample = TrainingSample("s", image, lesions, 1, voxel_mm3=3.0)

    node = DeviceArbiter(tmp_path)
    finished: list[float] = []

    def site_evaluates() -> None:
        evaluate_model(model, [sample], spec, DeviceArbiter(tmp_path))  # the site worker's own handle
        finished.append(time.monotonic())

    with node.clinical():
        evaluator = threading.Thread(target=site_evaluates)
        evaluator.start()
        time.sleep(1.0)
        assert not finished, "the evaluation ran while a clinical job held the device"
        released = time.monotonic()
    evaluator.join(timeout=60)
    assert finished and finished[0] >= released
    unguarded = evaluate_model(model, [sample], spec)  # without a node beside it nothing waits
    assert unguarded.dice_studies == 1
