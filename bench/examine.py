"""What deciding a study's inputs costs: seconds and bytes from a real Orthanc per study, for the examiner (series
selection + input fingerprint) and for the job's load (which, before input plans, examined the study again).

``RADFED_BENCH_EXAMINE_BASELINE=<git revision>`` (9f4c10e or later: before it, the modules had other paths) measures
that revision's ``inference`` package too (exported with ``git archive`` into a temporary folder imported first, in a
subprocess), on the same Orthanc in the same run. Bytes are the HTTP bodies Orthanc sent, counted on the client's
session."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import table

STUDIES = int(os.environ.get("RADFED_BENCH_EXAMINE_STUDIES", "4"))
REPEATS = int(os.environ.get("RADFED_BENCH_EXAMINE_REPEATS", "3"))


def _measured(client: Any, step: Callable[[], Any]) -> tuple[Any, float, int, int]:
    """``step()``'s value, wall seconds, response bytes and requests on ``client``'s session."""
    counts = [0, 0]

    def count(response: Any, *args: Any, **kwargs: Any) -> None:
        counts[0] += len(response.content)
        counts[1] += 1

    client._session.hooks["response"].append(count)
    try:
        started = time.perf_counter()
        value = step()
        return value, time.perf_counter() - started, counts[0], counts[1]
    finally:
        client._session.hooks["response"].remove(count)


def measure(url: str, username: str, password: str, study_ids: list[str], repeats: int) -> dict[str, Any]:
    """Per study, median over ``repeats``: examine and job-load seconds, bytes and requests, with whichever
    ``radfed.inference`` is imported (the input planner where it exists, else what the examiner did before)."""
    import importlib.util

    from radfed.inference.dicom.selection import select_series
    from radfed.inference.dicom.study_source import OrthancStudy
    from radfed.inference.model.taskspec import load_task_spec
    from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
    from radfed.inference.pipeline.findings import input_fingerprint
    from radfed.inference.pipeline.preprocess import load_study

    planner = importlib.util.find_spec("radfed.inference.pipeline.input_plan") is not None
    spec = load_task_spec(None)
    rows: dict[str, list[float]] = {}
    fingerprints = []
    with OrthancClient(OrthancEndpoint(url, username, password)) as client:
        for study_id in study_ids:
            for _ in range(repeats):
                if planner:
                    from radfed.inference.pipeline.input_plan import plan_study

                    # the study is opened inside each measured step: opening it is a request
                    def plan_new(s: str = study_id) -> Any:
                        return plan_study(OrthancStudy(client, s), spec)

                    plan, *examine = _measured(client, plan_new)
                    fingerprint = plan.fingerprint

                    def load_new(s: str = study_id, p: Any = plan) -> Any:
                        return load_study(OrthancStudy(client, s), spec, p)

                    loaded, *job = _measured(client, load_new)
                else:

                    def examine_old(s: str = study_id) -> str:  # NodeService.examine before input plans
                        study = OrthancStudy(client, s)
                        selection = select_series(spec, study.series())
                        return input_fingerprint(
                            uid for info in selection.chosen.values() for uid in study.sop_instance_uids(info)
                        )

                    fingerprint, *examine = _measured(client, examine_old)

                    def load_old(s: str = study_id) -> Any:
                        return load_study(OrthancStudy(client, s), spec)

                    loaded, *job = _measured(client, load_old)
                assert loaded.fingerprint == fingerprint
                for name, values in (("examine", examine), ("job", job)):
                    for label, value in zip(("s", "bytes", "requests"), values, strict=True):
                        rows.setdefault(f"{name}_{label}", []).append(float(value))
            fingerprints.append(fingerprint)
    result: dict[str, Any] = {key: statistics.median(values) for key, values in rows.items()}
    result["fingerprints"] = fingerprints
    result["planner"] = planner
    return result


def _worker(args: list[object], pythonpath: list[str]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    script = f"import json; from bench.examine import measure; print(json.dumps(measure(*{args!r})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(root)])}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _baseline(revision: str, args: list[object]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "radfed" / "inference"
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", revision, "inference"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive, check=True)
        return _worker(args, [folder])


def main() -> None:
    from radfed.inference.orthanc.client import OrthancClient
    from radfed.inference.testing.orthanc_server import OrthancOptions, start_orthanc
    from radfed.inference.testing.synthetic.sites import site_profile
    from radfed.inference.testing.synthetic.study import render_study
    from radfed.inference.testing.synthetic.writer import upload_study

    baseline = os.environ.get("RADFED_BENCH_EXAMINE_BASELINE")
    studies = [render_study(site_profile(1 + n % 3), n + 1, seed=5) for n in range(STUDIES)]
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = start_orthanc(Path(tmp) / "bench", OrthancOptions(name="bench-examine"))
        try:
            with OrthancClient(orthanc.endpoint) as client:
                for study in studies:
                    upload_study(study, client)
                ids = [client.find_study(s.identity.study_instance_uid) for s in studies]
            endpoint = orthanc.endpoint
            args = [endpoint.url, endpoint.username or "", endpoint.password or "", ids, REPEATS]
            runs = [("this tree", _worker(args, []))]
            if baseline:
                runs.append((f"at {baseline}", _baseline(baseline, args)))
        finally:
            orthanc.stop()
    rows = []
    for name, run in runs:
        rows.append(
            [
                name,
                "plan once, stored" if run["planner"] else "examine + job re-examines",
                f"{run['examine_s']:.3f}",
                f"{run['examine_bytes'] / 1e3:.1f}",
                f"{run['examine_requests']:.0f}",
                f"{run['job_s']:.3f}",
                f"{run['job_bytes'] / 1e6:.2f}",
                f"{run['job_requests']:.0f}",
                f"{run['examine_s'] + run['job_s']:.3f}",
            ]
        )
    same = len({tuple(run["fingerprints"]) for _, run in runs}) == 1
    table(
        f"examine + job load per study (3 x 24 x 256 x 256 mp-MRI + SEG), median of {REPEATS} x {STUDIES} studies; "
        f"same fingerprints: {same}",
        [
            "revision",
            "decision",
            "examine s",
            "examine kB",
            "examine GETs",
            "job load s",
            "job MB",
            "job GETs",
            "total s",
        ],
        rows,
        "RADFED_BENCH_EXAMINE_BASELINE=<rev> .ci/isolated .venv/bin/python -m bench examine",
    )


if __name__ == "__main__":
    main()
