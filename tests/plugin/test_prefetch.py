"""Working ahead before StableStudy: a study prepared while it was still arriving gives the same result as
one processed from scratch, and an instance arriving after the prepared copy is never left out."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from radfed.inference.dicom.selection import select_series
from radfed.inference.dicom.study_source import OrthancStudy
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.pipeline.findings import input_fingerprint
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.inference.testing.synthetic.writer import upload_study
from tests.plugin.node_harness import NodeProcess, wait_until


@pytest.fixture
def nodes(node_factory: Callable[..., NodeProcess]) -> Callable[..., NodeProcess]:
    """Started nodes (stopped at teardown by node_factory)."""

    def start(orthanc: OrthancProcess, **kwargs: object) -> NodeProcess:
        node = node_factory(orthanc, **kwargs)
        node.start()
        return node

    return start


def _study(number: int) -> SyntheticStudy:
    return render_study(site_profile(1, small=True), number, seed=8)


def _done(node: NodeProcess, count: int) -> Callable[[], bool]:
    return lambda: len(node.jobs("done")) + len(node.jobs("failed")) >= count


def test_prepared_ahead_equals_processed_from_scratch(
    orthanc_factory: Callable[..., OrthancProcess], nodes: Callable[..., NodeProcess]
) -> None:
    ahead_orthanc, plain_orthanc = orthanc_factory("ahead", stable_age_s=4), orthanc_factory("plain", stable_age_s=4)
    ahead = nodes(ahead_orthanc)
    plain = nodes(plain_orthanc, prefetch=False)
    study = _study(2)
    for orthanc in (ahead_orthanc, plain_orthanc):
        with OrthancClient(orthanc.endpoint) as client:
            upload_study(study, client)
    wait_until(_done(ahead, 1), 120, "the prefetching node's job", ahead.log_tail)
    wait_until(_done(plain, 1), 120, "the plain node's job", plain.log_tail)
    [with_prefetch], [without] = ahead.jobs(), plain.jobs()
    assert with_prefetch["state"] == without["state"] == "done", (with_prefetch["reason"], without["reason"])
    assert with_prefetch["result"]["prepared_ahead"] is True
    assert without["result"]["prepared_ahead"] is False
    # The work done ahead is reported as such; the job itself only ran the model onwards.
    assert {"ahead_load", "ahead_preprocess"} <= set(with_prefetch["timings_s"])
    assert not {"fetch", "load", "preprocess"} & set(with_prefetch["timings_s"])
    assert {"fetch", "load", "preprocess"} <= set(without["timings_s"])
    assert with_prefetch["fingerprint"] == without["fingerprint"]
    for key in ("lesions", "study_probability", "category"):
        assert with_prefetch["result"][key] == without["result"][key], key
    metrics = ahead.get_text("/metrics")
    assert 'radfed_prefetch_total{outcome="used"} 1.0' in metrics


def test_an_instance_arriving_after_the_prepared_copy_is_not_left_out(
    orthanc_factory: Callable[..., OrthancProcess], nodes: Callable[..., NodeProcess]
) -> None:
    orthanc = orthanc_factory("late", stable_age_s=6)
    node = nodes(orthanc)
    study = _study(3)
    t2w = study.series[Sequence.T2W]
    late = t2w[-1]  # the last slice: the partial series is still regular, so it gets prepared
    with OrthancClient(orthanc.endpoint) as client:
        for sequence in Sequence:
            for ds in study.series[sequence]:
                if ds is not late:
                    client.upload_dataset(ds)
        client.upload_dataset(study.reference_seg)
        prepared = 'radfed_prepared_ahead_total{ok="true"} 1.0'
        wait_until(lambda: prepared in node.get_text("/metrics"), 60, "the partial study prepared", node.log_tail)
        client.upload_dataset(late)  # after the prepared copy, before StableStudy
        wait_until(_done(node, 1), 120, "the job", node.log_tail)
        [job] = node.jobs()
        study_id = client.find_study(study.identity.study_instance_uid)
        assert study_id is not None
        source = OrthancStudy(client, study_id)
        selection = select_series(load_task_spec(None), source.series())
        complete = input_fingerprint(
            uid for info in selection.chosen.values() for uid in source.sop_instance_uids(info)
        )
    assert job["state"] == "done", job["reason"]
    assert job["fingerprint"] == complete  # the result is for every instance, the late one included
