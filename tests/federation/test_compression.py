"""Update compression: each scheme's round-trip error, top-k's error feedback, what a payload weighs, the
run-config key, the payload through Flower's records, and a site's compressed reply replayed unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from radfed.federation.job import records
from radfed.federation.job.run_config import RunConfig, RunConfigError
from radfed.federation.learning.compression import (
    RESIDUAL,
    Compression,
    ErrorFeedback,
    Scheme,
    compress,
    compress_reply,
    decompress,
    payload_nbytes,
    restore_reply,
)
from radfed.federation.learning.training import new_model
from radfed.federation.site import rounds as site_code
from radfed.federation.site.config import SiteConfig
from radfed.inference.model.taskspec import TaskSpec

# a small network's tensor shapes: convolutions, biases, a norm's scalars
SHAPES = [(32, 16, 3, 3, 3), (32,), (64, 32, 3, 3, 3), (64,), (2, 64, 1, 1, 1), (2,)]


def update(seed: int = 0, scale: float = 1e-3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def model_bytes() -> int:
    return sum(int(np.prod(s)) * 4 for s in SHAPES)


def test_fp16_is_exact_to_half_precision() -> None:
    sent = update()
    payload, residual = compress(sent, Compression(Scheme.FP16))
    assert residual is None
    for original, restored in zip(sent, decompress(payload), strict=True):
        assert restored.shape == original.shape and restored.dtype == np.float32
        np.testing.assert_array_equal(restored, original.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(restored, original, rtol=2**-11, atol=2**-24)


def test_int8_is_within_half_a_step_of_each_tensors_scale() -> None:
    sent = update()
    sent[3][:] = 0.0  # an all-zero tensor has scale 0 and comes back as zeros
    payload, _ = compress(sent, Compression(Scheme.INT8))
    scales = payload[2]
    for original, restored, scale in zip(sent, decompress(payload), scales, strict=True):
        assert float(scale) == pytest.approx(float(np.abs(original).max()) / 127)
        assert np.abs(restored - original).max() <= float(scale) / 2 * (1 + 1e-5) + 1e-12
    np.testing.assert_array_equal(decompress(payload)[3], 0.0)


def test_topk_sends_the_largest_entries_exactly_and_zero_elsewhere() -> None:
    sent = update()
    payload, residual = compress(sent, Compression(Scheme.TOPK, 0.05))
    assert residual is not None
    for original, restored, left in zip(sent, decompress(payload), residual, strict=True):
        kept = restored != 0
        assert kept.sum() == max(1, int(np.ceil(0.05 * original.size)))
        np.testing.assert_array_equal(restored[kept], original[kept])
        assert np.abs(original[~kept]).max(initial=0.0) <= np.abs(original[kept]).min()
        np.testing.assert_array_equal(restored + left, original)  # what is not sent is kept, exactly


def test_error_feedback_sends_the_sum_of_the_updates_over_rounds(tmp_path: Path) -> None:
    """With the residual carried, what the coordinator receives over rounds adds up to what the site meant
    to send, less one round's residual (which shrinks relative to the total as rounds go on)."""
    compression = Compression(Scheme.TOPK, 0.1)
    feedback = ErrorFeedback(tmp_path / "job")
    meant: list[np.ndarray] = [np.zeros(s, np.float32) for s in SHAPES]
    received: list[np.ndarray] = [np.zeros(s, np.float32) for s in SHAPES]
    start = [np.zeros(s, np.float32) for s in SHAPES]
    gaps = []
    for server_round in range(1, 41):
        true = update(seed=server_round)
        local = [g + u for g, u in zip(start, true, strict=True)]
        payload = compress_reply(compression, start, local, feedback, server_round)
        meant = [m + u for m, u in zip(meant, true, strict=True)]
        received = [r + u for r, u in zip(received, decompress(payload), strict=True)]
        residual = feedback.residual_for(server_round + 1, true)
        assert residual is not None
        for m, r, left in zip(meant, received, residual, strict=True):
            np.testing.assert_allclose(r + left, m, atol=1e-5)  # nothing lost: sent + kept = meant
        gaps.append(_norm(meant, received) / _norm(meant))
    without_feedback = _norm(update(1), decompress(compress(update(1), compression)[0])) / _norm(update(1))
    assert gaps[-1] < 0.5 * without_feedback and gaps[-1] < gaps[4]


def _norm(a: list[np.ndarray], b: list[np.ndarray] | None = None) -> float:
    return float(np.sqrt(sum(float(np.sum((x - (y if b else 0)) ** 2)) for x, y in zip(a, b or a, strict=True))))


def test_a_round_trained_again_starts_from_the_same_residual(tmp_path: Path) -> None:
    compression, feedback = Compression(Scheme.TOPK, 0.1), ErrorFeedback(tmp_path)
    zero = [np.zeros(s, np.float32) for s in SHAPES]
    compress_reply(compression, zero, update(1), feedback, 1)
    first = compress_reply(compression, zero, update(2), feedback, 2)
    again = compress_reply(compression, zero, update(2), feedback, 2)  # a crash before the reply was stored
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert feedback.residual_for(1, zero) is None  # a coordinator gone back to an earlier round: nothing carried


@pytest.mark.parametrize(
    ("setting", "low", "high"), [("fp16", 1.99, 2.0), ("int8", 3.98, 4.0), ("topk:0.05", 9.8, 10.0)]
)
def test_a_payload_weighs_what_its_scheme_promises(setting: str, low: float, high: float) -> None:
    payload, _ = compress(update(), Compression.parse(setting))
    assert low <= model_bytes() / payload_nbytes(payload) <= high


def test_a_payload_survives_flowers_records_and_wire() -> None:
    payload, _ = compress(update(), Compression.parse("topk:0.05"))
    record = RecordDict({"arrays": records.pack_arrays(payload)})  # as the ClientApp packs a reply
    wire = recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(record).SerializeToString()))
    received = records.arrays(wire)
    assert payload_nbytes(received) == payload_nbytes(payload)
    for a, b in zip(received, payload, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("setting", ["fp16", "int8", "topk:0.05"])
def test_the_coordinator_restores_the_sites_model(setting: str) -> None:
    compression = Compression.parse(setting)
    start = update(seed=7, scale=1.0)
    local = [g + u for g, u in zip(start, update(), strict=True)]
    restored = restore_reply(compression, start, compress_reply(compression, start, local))
    sent = decompress(compress([b - a for a, b in zip(start, local, strict=True)], compression)[0])
    for r, a, u in zip(restored, start, sent, strict=True):
        assert r.dtype == np.float32
        np.testing.assert_array_equal(r, (a.astype(np.float64) + u).astype(np.float32))


def test_a_reply_that_does_not_match_the_jobs_setting_is_refused() -> None:
    start = update()
    with pytest.raises(ValueError, match="uncompressed reply"):
        restore_reply(Compression.parse("int8"), start, start)
    with pytest.raises(ValueError, match="compressed reply in a job without"):
        restore_reply(Compression(), start, compress(start, Compression.parse("int8"))[0])
    with pytest.raises(ValueError, match="shapes"):
        restore_reply(Compression.parse("int8"), start[:2], compress(start, Compression.parse("int8"))[0])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", Compression()),
        ("fp16", Compression(Scheme.FP16)),
        ("INT8", Compression(Scheme.INT8)),
        ("topk:0.05", Compression(Scheme.TOPK, 0.05)),
        ("topk:1", Compression(Scheme.TOPK, 1.0)),
    ],
)
def test_the_run_config_reads_every_setting(text: str, expected: Compression) -> None:
    assert RunConfig.from_run_config({"compression": text}).update_compression == expected


@pytest.mark.parametrize("text", ["zip", "topk", "topk:0", "topk:1.5", "topk:x", "topk:nan", "fp16:2", "int4"])
def test_an_unknown_setting_names_the_key(text: str) -> None:
    with pytest.raises(RunConfigError, match="run-config key compression must be none, fp16, int8 or topk:F"):
        RunConfig.from_run_config({"compression": text})


def test_a_sites_compressed_reply_is_replayed_unchanged(
    tmp_path: Path, synth_root: Path, planned_spec: TaskSpec
) -> None:
    site = SiteConfig.from_node_config(
        {"data": str(synth_root / "site-1"), "state-dir": str(tmp_path / "state"), "site-name": "site-1"}
    )
    assert planned_spec.plan is not None
    config = {"job": "topk", "server-round": 1, "local-steps": 2, "epsilon": 0.0, "compression": "topk:0.05"}
    plan = site_code.RoundPlan.from_config(config | {"plan": planned_spec.plan.to_json()})
    start = site_code.model_to_arrays(new_model(planned_spec))

    sent, first = site_code.train_round(site, plan, start)
    residual = site.job_dir("topk") / RESIDUAL
    stored = residual.read_bytes()
    assert payload_nbytes(sent) < payload_nbytes(start) / 9
    restored = restore_reply(plan.run.update_compression, start, sent)
    assert [r.shape for r in restored] == [s.shape for s in start]

    again, second = site_code.train_round(site, plan, start)
    assert second["round_replayed"] == 1 and "round_replayed" not in first
    for a, b in zip(sent, again, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert residual.read_bytes() == stored  # the replay left top-k's residual alone
