"""bfloat16 autocast in training: on CUDA by default, on a CPU only when the recipe asks and the CPU has native
bf16, off by the recipe, and the loss computed in float32 either way."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from radfed.federation.learning.training import (
    TrainingSettings,
    cpu_has_native_bf16,
    mixed_precision,
    model_to_arrays,
    new_model,
    train_local,
)
from radfed.inference.model.recipe import TrainingRecipe

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [(ZEN4, True), (SKYLAKE, False), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), ("", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, cpuinfo: str, native: bool) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_native_bf16(path) is native


def test_an_unreadable_cpuinfo_means_no_bf16(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def test_the_recipe_decides_where_mixed_precision_runs() -> None:
    recipe = TrainingRecipe()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mixed_precision(cuda, recipe) is True
    assert mixed_precision(cpu, recipe) is False  # opt-in on a CPU (README: lower Dice on the real brain set)
    on_cpu = replace(recipe, cpu_mixed_precision=True)
    assert mixed_precision(cpu, on_cpu) is cpu_has_native_bf16()
    for device in (cpu, cuda):
        assert mixed_precision(device, replace(on_cpu, mixed_precision=False)) is False


def test_the_spec_reads_the_cpu_setting() -> None:
    from radfed.inference.model.taskspec import load_task_spec, parse_task_spec

    text = load_task_spec(None).source_text.replace("[training]\n", "[training]\ncpu_mixed_precision = true\n", 1)
    assert parse_task_spec(text, "test").training.cpu_mixed_precision is True
    assert load_task_spec(None).training.cpu_mixed_precision is False


def test_training_under_mixed_precision_learns_in_float32_weights(synth_root: Path, planned_spec: Any) -> None:
    """Two steps from the same weights and patches: with CPU mixed precision on a native-bf16 CPU the weights
    differ from float32 training (autocast really ran), stay float32 and finite; elsewhere the two are identical."""
    from radfed.federation.learning.cohort import cohort_from_sources

    samples = cohort_from_sources(planned_spec, [str(synth_root)]).samples
    runs = {}
    for on in (True, False):
        training = replace(planned_spec.training, cpu_mixed_precision=on, time_limit_minutes=0)
        spec = replace(planned_spec, training=training)
        model = new_model(spec, seed=3)
        log = train_local(model, samples, spec, TrainingSettings.from_spec(spec, steps=2, seed=3))
        assert all(torch.isfinite(torch.tensor(loss)) for loss in log.losses)
        runs[on] = model_to_arrays(model)
    assert all(a.dtype.name == "float32" for a in runs[True])
    same = all((a == b).all() for a, b in zip(runs[True], runs[False], strict=True))
    assert same is not cpu_has_native_bf16()
