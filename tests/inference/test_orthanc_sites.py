"""Real Orthanc servers, one per simulated hospital: synthetic studies go in and come back exact."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
from radfed.inference.testing.orthanc_server import OrthancProcess, free_port
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.plugin.commands.cli import main

STUDIES_PER_SITE = 2


def _url_with_credentials(instance: OrthancProcess) -> str:
    return f"http://{instance.options.username}:{instance.options.password}@127.0.0.1:{instance.http_port}"


def test_three_hospitals_receive_their_own_studies(orthanc_factory: Callable[..., OrthancProcess]) -> None:
    sites = [orthanc_factory(f"site-{i}") for i in (1, 2, 3)]
    args = [
        "synth",
        "--sites",
        "3",
        "--studies-per-site",
        str(STUDIES_PER_SITE),
        "--seed",
        "5",
        "--small",
        "-q",
    ]
    for instance in sites:
        args += ["--orthanc", _url_with_credentials(instance)]
    assert main(args) == 0

    for index, instance in enumerate(sites, start=1):
        expected = [render_study(site_profile(index, small=True), n, 5) for n in range(1, STUDIES_PER_SITE + 1)]
        with OrthancClient(instance.endpoint) as client:
            stats = client.get_json("/statistics")
            assert stats["CountStudies"] == STUDIES_PER_SITE
            assert stats["CountSeries"] == 4 * STUDIES_PER_SITE  # T2W, ADC, DWI, reference SEG
            n_instances = sum(1 + sum(len(s.series[q]) for q in Sequence) for s in expected)
            assert stats["CountInstances"] == n_instances
            for study in expected:
                study_id = client.find_study(study.identity.study_instance_uid)
                assert study_id is not None
                tags = client.study(study_id)["MainDicomTags"]
                assert tags["AccessionNumber"] == study.identity.accession_number
                # Every series fetched back from Orthanc loads to the same voxels and geometry.
                for series_id in client.study(study_id)["Series"]:
                    datasets = client.series_datasets(series_id)
                    if datasets[0].Modality == "SEG":
                        assert datasets[0].SOPInstanceUID == study.reference_seg.SOPInstanceUID
                        continue
                    sequence = next(
                        q for q in Sequence if study.series[q][0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
                    )
                    original = volume_from_datasets(study.series[sequence])
                    fetched = volume_from_datasets(datasets)
                    np.testing.assert_array_equal(fetched.array, original.array)
                    np.testing.assert_allclose(fetched.affine, original.affine, atol=1e-6)


def test_client_names_the_failure(orthanc: OrthancProcess) -> None:
    with OrthancClient(orthanc.endpoint) as client, pytest.raises(OrthancRequestError) as info:
        client.study("no-such-study")
    assert info.value.status == 404
    wrong_password = OrthancEndpoint(orthanc.url, orthanc.options.username, "wrong")
    with OrthancClient(wrong_password) as client, pytest.raises(OrthancRequestError) as info:
        client.system()
    assert info.value.status == 401
    with (
        OrthancClient(OrthancEndpoint(f"http://127.0.0.1:{free_port()}"), timeout_s=2) as client,
        pytest.raises(OrthancUnavailableError),
    ):
        client.system()


def test_restart_keeps_storage(orthanc: OrthancProcess, orthanc_client: OrthancClient) -> None:
    study = render_study(site_profile(1, small=True), 1, 0)
    orthanc_client.upload_dataset(study.series[Sequence.ADC][0])
    orthanc.restart()
    with OrthancClient(orthanc.endpoint) as client:
        assert client.get_json("/statistics")["CountInstances"] == 1


def test_remote_access_is_off_and_auth_on(orthanc: OrthancProcess) -> None:
    import json

    config = json.loads((orthanc.workdir / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False
    assert config["AuthenticationEnabled"] is True
