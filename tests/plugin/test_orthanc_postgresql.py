"""A site's Orthanc with its index on PostgreSQL (issue 19 item 3): Debian ``orthanc-postgresql`` on a PostgreSQL
server the test starts (loopback port, own data folder, stopped by PID). A study stored before a restart of Orthanc
is still there after it, with its StableStudy change, and radfed's node (its ledger on the same server) processes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.inference.testing.synthetic.writer import study_datasets, upload_study
from tests.plugin.node_harness import NodeProcess, wait_until
from tests.plugin.test_node_service import _results_per_study, _studies
from tests.postgres_server import USER, PostgresServer

pytestmark = pytest.mark.orthanc

INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"  # Debian orthanc-postgresql (the storage plugin stays off)


def _postgresql_index(server: PostgresServer, database: str) -> dict[str, Any]:
    """Orthanc's configuration section for the plugin: the index in ``database``, DICOM files on disk."""
    return {
        "PostgreSQL": {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": "127.0.0.1",
            "Port": server.port,
            "Database": database,
            "Username": USER,
            "Password": server.password,
            "Lock": True,  # one Orthanc per index
        }
    }


def _indexed(server: PostgresServer, database: str, orthanc_id: str) -> int:
    """How many rows of the plugin's Resources table carry this Orthanc id."""
    with server.connect(database) as connection:
        row = connection.execute("SELECT count(*) FROM resources WHERE publicid = %s", (orthanc_id,)).fetchone()
    return int(row[0]) if row else 0


def test_an_orthanc_indexed_in_postgresql_keeps_a_study_across_a_restart_and_the_node_processes_it(
    orthanc_factory: Callable[..., OrthancProcess],
    postgres: PostgresServer,
    postgres_url: str,
    node_factory: Callable[..., NodeProcess],
) -> None:
    database = f"orthanc_index_{os.getpid()}"
    postgres.create_database(database)
    orthanc = orthanc_factory("pg-index", plugins=(INDEX_PLUGIN,), extra=_postgresql_index(postgres, database))
    study = _studies(1, seed=31)[0]
    uid = study.identity.study_instance_uid
    with OrthancClient(orthanc.endpoint) as client:
        assert "postgresql-index" in client.get_json("/plugins")
        assert upload_study(study, client) == len(list(study_datasets(study)))
        study_id = client.find_study(uid)
        assert study_id is not None
        wait_until(lambda: client.get_json(f"/studies/{study_id}")["IsStable"], 60, "StableStudy", orthanc.log_tail)
        instances = len(client.get_json(f"/studies/{study_id}/instances"))
    assert _indexed(postgres, database, study_id) == 1, "the study is not in the PostgreSQL index"
    assert not (orthanc.workdir / "index" / "index").exists(), "Orthanc made its own SQLite index"

    orthanc.restart(timeout_s=120)  # a loaded machine: Orthanc and its index plugin take their time
    with OrthancClient(orthanc.endpoint) as client:
        assert client.find_study(uid) == study_id
        assert len(client.get_json(f"/studies/{study_id}/instances")) == instances
    # A new ledger follows Orthanc from now; the StableStudy change from before the restart (kept in the index)
    # is found when asked for.
    node = node_factory(orthanc, node_settings=f'database_url = "{postgres_url}"')
    node.start(timeout_s=300)  # imports and model load on a loaded machine
    assert node.ready()["ledger_backend"] == "postgresql"
    assert node.post("/reprocess?since=20000101") == {"since": "20000101", "studies": 1}
    ledger = postgres_url.rsplit("/", 1)[1]

    def finished() -> bool:  # read from the ledger: the node's API shares the process with the job's inference
        with postgres.connect(ledger) as connection:
            states = [row[0] for row in connection.execute("SELECT state FROM jobs")]
        return states in (["done"], ["failed"])

    wait_until(finished, 600, "the job", node.log_tail)
    (job,) = node.jobs()
    assert job["state"] == "done" and job["study_instance_uid"] == uid, job
    expected = {"SR": 1, **({"SEG": 1} if job["result"]["lesions"] else {})}

    # The node's results are in the PostgreSQL index too: there after another restart.
    orthanc.restart(timeout_s=120)
    with OrthancClient(orthanc.endpoint) as client:
        assert _results_per_study(client)[uid] == expected
        sr = client.find_instance(job["result"]["sr_sop_instance_uid"])
    assert sr is not None and _indexed(postgres, database, sr) == 1
    assert "Traceback" not in node.log_tail(400)
