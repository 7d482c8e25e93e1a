"""Secure aggregation's parts that need no Flower process: what the run config refuses with it, the site's
clipped update and weight, and the ClientApp mod leaving every other message alone."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from radfed.federation.coordinator.secure_aggregation import max_weight, secure_section
from radfed.federation.job.run_config import RunConfig, RunConfigError
from radfed.federation.site import client_app
from radfed.federation.site.secure_aggregation import clipped_update, secure_aggregation_mod, secure_weight


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"aggregation": "multi-krum"}, "aggregation"),
        ({"compression": "int8"}, "compression"),
        ({"round-quorum": 2}, "round-quorum"),
        ({"round-deadline": 30.0}, "round-deadline"),
        ({"min-sites": 1}, "min-sites"),
    ],
)
def test_what_needs_each_update_is_refused_with_secure_aggregation(values: dict[str, object], key: str) -> None:
    RunConfig.from_run_config(values)  # fine in the clear
    with pytest.raises(RunConfigError, match=key):
        RunConfig.from_run_config({"secure-aggregation": True, **values})


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"update-clip-norm": 0.0}, "update-clip-norm"),
        ({"secure-aggregation-threshold": 0.0}, "secure-aggregation-threshold"),
        ({"secure-aggregation-threshold": 1.5}, "secure-aggregation-threshold"),
        ({"secure-aggregation-shares": 2}, "secure-aggregation-shares"),
    ],
)
def test_secure_aggregation_settings_out_of_range_are_refused(values: dict[str, object], key: str) -> None:
    with pytest.raises(RunConfigError, match=key):
        RunConfig.from_run_config({"secure-aggregation": True, **values})


def test_an_update_longer_than_the_clip_norm_is_scaled_to_it_and_a_shorter_one_is_not() -> None:
    received = [np.zeros((3, 4), np.float32), np.ones(5, np.float32)]
    trained = [np.full((3, 4), 2.0, np.float32), np.ones(5, np.float32) * 3]  # update norm sqrt(12*4 + 5*4) = 8.25
    update, clipped = clipped_update(trained, received, 1.0)
    assert clipped and all(u.dtype == np.float32 for u in update)
    assert np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update)) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(update[0] / update[0].flat[0], 1.0)  # the direction is kept
    same, clipped = clipped_update(trained, received, 10.0)
    assert not clipped and np.array_equal(same[1], np.full(5, 2.0, np.float32))
    with pytest.raises(ValueError, match="not finite"):
        clipped_update([np.array([np.inf], np.float32)], [np.zeros(1, np.float32)], 1.0)
    with pytest.raises(ValueError, match="2 trained tensors for 1"):
        clipped_update(trained, received[:1], 1.0)


def test_a_sites_weight_is_its_studies_capped_at_the_rounds_max_weight() -> None:
    assert secure_weight(12, 40) == 12
    assert secure_weight(60, 40) == 40  # more studies than the coordinator heard of: capped, never above 1
    assert secure_weight(12, 1) == 1  # round 1 without counts: every site weighs the same
    assert max_weight({}) == 1 and max_weight({"a": 12, "b": 30}) == 30


def test_the_mod_passes_every_message_outside_a_secure_round_to_radfeds_handler() -> None:
    seen: list[Message] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict({"ok": ConfigRecord({"x": 1})}), reply_to=msg)

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE, "query.landmarks"):
        metadata = Metadata(1, "m", 0, 2, "", "1", 0.0, 60.0, message_type)  # as a SuperNode receives it
        msg = Message(RecordDict({"config": ConfigRecord({"a": 1})}), metadata=metadata)
        reply = secure_aggregation_mod(msg, context, handler)
        assert seen[-1] is msg and "ok" in reply.content
    assert len(seen) == 3 and not context.state.config_records  # no SecAgg+ state was created
    assert secure_aggregation_mod in client_app.app._mods  # the shipped ClientApp runs behind the mod


def test_the_model_card_states_the_trade_off_only_when_the_job_used_it() -> None:
    assert secure_section(RunConfig()) == ""
    section = secure_section(RunConfig(secure_aggregation=True, update_clip_norm=5.0))
    assert section.startswith("## Secure aggregation") and "L2 norm 5" in section and "screened" in section
