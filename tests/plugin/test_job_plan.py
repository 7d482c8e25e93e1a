"""A job keeps the input plan its study was examined with (migration 0003), and a job from before plans keeps
running: it has none, so it plans its study again."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from radfed.inference.dicom.study_source import FolderStudy
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.pipeline.input_plan import InputPlan, plan_study
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import write_study
from radfed.plugin.node.ledger.migrations import LOCATION
from radfed.plugin.node.ledger.store import JobStatus, Ledger


def test_a_claimed_job_carries_the_plan_it_was_created_with(tmp_path: Path, small_study: SyntheticStudy) -> None:
    plan = plan_study(FolderStudy(write_study(small_study, tmp_path / "study")), load_task_spec(None))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        job, created = ledger.create_job(
            study_instance_uid=plan.study_instance_uid, orthanc_study_id="o-1", model_name="m", model_version="1",
            fingerprint=plan.fingerprint, selection=plan.describe(), plan=plan.to_json(),
        )  # fmt: skip
        assert created
        claimed = ledger.claim("worker-a")
        assert claimed is not None and claimed.id == job.id
        assert InputPlan.from_json(claimed.plan) == plan
        assert claimed.selection == plan.describe()
    finally:
        ledger.close()


def test_a_job_from_revision_0002_gets_an_empty_plan_and_plans_again(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
        columns = {c["name"] for c in sa.inspect(connection).get_columns("jobs")}
        assert "plan" not in columns
        connection.execute(
            sa.text(
                "INSERT INTO jobs (study_instance_uid, orthanc_study_id, model_name, model_version, fingerprint, "
                "state, created, updated) VALUES ('1.2.3', 'o-1', 'm', '1', 'f', 'queued', :now, :now)"
            ),
            {"now": time.time()},
        )
    engine.dispose()
    ledger = Ledger(path)  # migrates to the head
    try:
        [job] = ledger.jobs(state=JobStatus.QUEUED)
        assert job.plan == {} and InputPlan.from_json(job.plan) is None
    finally:
        ledger.close()
