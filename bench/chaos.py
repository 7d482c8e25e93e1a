"""Chaos: a real ``radfed serve`` process beside a real Orthanc (loopback), under faults. Per scenario: studies
sent, done once, failed with a reason, lost, duplicated results (radfed SR instances per study), jobs left
queued/running, and how long ``/ready`` took to report the fault and to recover.

1. malformed studies mixed into good ones; 2. ``kill -9`` of the node mid-batch, restart; 3. Orthanc SIGKILLed
inside StableAge right after an upload, restarted (the reconciler must find the study); 4. the state disk (a small
tmpfs in a private mount namespace) filled while studies arrive, then freed; 5. a ledger scribbled over while the
node is stopped (``radfed serve`` must refuse to start, naming the file).

    PYTHONPATH=. nice -n 15 bash .ci/isolated .venv/bin/python -m bench chaos
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pydicom.dataset import Dataset

from bench.report import table
from radfed.federation.learning.train_local import train_local_artifact
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancOptions, OrthancProcess, free_port, start_orthanc
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.inference.testing.synthetic.writer import study_datasets, synthesize_to_folder

TOKEN = "chaos-bench-token"
COMMAND = "PYTHONPATH=. nice -n 15 bash .ci/isolated .venv/bin/python -m bench chaos"
FINISH_S = 150.0  # how long a scenario waits for its studies
STATE_DISK_MB = 16
DONE, FAILED = "done", "failed"


def _wait(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return False


class Node:
    """One ``radfed serve`` process; ``wrap`` runs it inside another command (a mount namespace)."""

    def __init__(self, workdir: Path, orthanc: OrthancProcess, artifact: tuple[Path, str], settings: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.artifact = workdir, artifact
        self.state_dir = workdir / "state"
        self.port = free_port()
        self.config = workdir / "node.toml"
        self.config.write_text(
            f'[orthanc]\nurl = "{orthanc.url}"\nusername = "{orthanc.options.username}"\n\n'
            f'[node]\nstate_dir = "{self.state_dir}"\nmodels_dir = "{workdir / "models"}"\nconcurrency = 2\n'
            f"poll_interval_s = 0.3\nretry_base_s = 1.0\nretry_max_s = 4.0\n{settings}\n\n[api]\nport = {self.port}\n"
        )
        self.env = dict(
            os.environ,
            RADFED_ORTHANC_PASSWORD=orthanc.options.password,
            RADFED_API_TOKEN=TOKEN,
            ORT_DISABLE_TELEMETRY="1",
        )
        self.log = workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, *, with_model: bool = True) -> list[str]:
        args = [sys.executable, "-m", "radfed.plugin", "-v", "serve", "--config", str(self.config)]
        return args + (["--install-model", str(self.artifact[0]), "--activate", self.artifact[1]] if with_model else [])

    def start(self, wrap: Iterable[str] = ()) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*wrap, *self.argv()], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not _wait(self._answers, 120):
            raise RuntimeError(f"radfed serve did not answer in 120 s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"radfed serve exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            return requests.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def jobs(self) -> list[dict[str, Any]]:
        response = requests.get(self.url + "/jobs", headers=self.headers, params={"limit": 1000}, timeout=10)
        response.raise_for_status()
        return response.json()

    def count(self, *states: str) -> int:
        return sum(job["state"] in states for job in self.jobs())

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ReadyWatch:
    """Polls ``/ready`` in a thread: (monotonic time, "ready" | "not-ready" | "down", problems)."""

    node: Node
    samples: list[tuple[float, str, list[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ReadyWatch:
        threading.Thread(target=self._poll, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                body = requests.get(self.node.url + "/ready", headers=self.node.headers, timeout=5).json()
                sample = (time.monotonic(), "ready" if body["ready"] else "not-ready", list(body["problems"]))
            except (requests.RequestException, ValueError, KeyError):
                sample = (time.monotonic(), "down", [])
            self.samples.append(sample)
            self._stop.wait(0.25)

    def first(self, after: float, state: str, word: str = "") -> tuple[float, list[str]] | None:
        """Seconds from ``after`` to the first sample in ``state`` (whose problems mention ``word``)."""
        for at, seen, problems in list(self.samples):
            if at >= after and seen == state and (not word or any(word in p for p in problems)):
                return at - after, problems
        return None

    def wait(self, after: float, state: str, timeout_s: float, word: str = "") -> tuple[float, list[str]] | None:
        _wait(lambda: self.first(after, state, word) is not None, timeout_s, 0.1)
        return self.first(after, state, word)

    def not_ready_samples(self) -> int:
        return sum(seen != "ready" for _, seen, _ in self.samples)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    as_expected: int = 0
    done_once: int = 0
    failed_with_reason: int = 0
    lost: int = 0
    duplicated: int = 0
    stalled: int = 0
    reported_s: str = "-"
    recovered_s: str = "-"
    note: str = ""

    def cells(self) -> list[object]:
        counts: list[object] = [
            f"{self.as_expected}/{self.sent}",
            self.done_once,
            self.failed_with_reason,
            self.lost,
            self.duplicated,
            self.stalled,
        ]
        return [
            self.scenario,
            self.sent or "-",
            *(counts if self.sent else ["-"] * len(counts)),
            self.reported_s,
            self.recovered_s,
            self.note,
        ]


def _radfed_srs(client: OrthancClient, study_instance_uid: str) -> int:
    """SR instances written by radfed (Manufacturer radfed) in the study."""
    study_id = client.find_study(study_instance_uid)
    if study_id is None:
        return 0
    count = 0
    for series_id in client.study(study_id)["Series"]:
        tags = client.series(series_id)["MainDicomTags"]
        if tags.get("Manufacturer") == "radfed" and tags.get("Modality") == "SR":
            count += len(client.series(series_id)["Instances"])
    return count


def tally(row: Row, node: Node, orthanc: OrthancProcess, expected: dict[str, str]) -> Row:
    """Fill ``row`` from the node's jobs and Orthanc's SRs; ``expected`` maps StudyInstanceUID -> done | failed."""
    jobs = node.jobs()
    row.sent = len(expected)
    row.stalled = sum(job["state"] in ("queued", "running") for job in jobs)
    with OrthancClient(orthanc.endpoint) as client:
        for uid, want in expected.items():
            mine = [job for job in jobs if job["study_instance_uid"] == uid]
            srs = _radfed_srs(client, uid)
            row.duplicated += srs > 1
            done = any(job["state"] == DONE for job in mine)
            failed = not done and any(job["state"] == FAILED and job["reason"] for job in mine)
            row.done_once += done and srs == 1
            row.failed_with_reason += failed
            row.lost += not mine
            row.as_expected += (want == DONE and done and srs == 1) or (want == FAILED and failed)
    return row


def _finished(node: Node, expected: dict[str, str]) -> Callable[[], bool]:
    def check() -> bool:
        jobs = node.jobs()
        terminal = {j["study_instance_uid"] for j in jobs if j["state"] in (DONE, FAILED)}
        busy = any(j["state"] in ("queued", "running") for j in jobs)
        return not busy and set(expected) <= terminal

    return check


def _upload(datasets: Iterable[Dataset], orthanc: OrthancProcess) -> None:
    with OrthancClient(orthanc.endpoint) as client:
        for ds in datasets:
            client.upload_dataset(ds)


def _studies(first: int, count: int, seed: int) -> list[SyntheticStudy]:
    return [render_study(site_profile(1 + n % 3, small=True), 1 + n // 3, seed) for n in range(first, first + count)]


# -- 1. malformed studies ------------------------------------------------------------------------------------


def _damage(study: SyntheticStudy, how: str) -> list[Dataset]:
    datasets = [copy.deepcopy(ds) for ds in study_datasets(study)]
    t2w_uid = study.series[Sequence.T2W][0].SeriesInstanceUID
    t2w = [ds for ds in datasets if ds.get("SeriesInstanceUID") == t2w_uid]
    mr = [ds for ds in datasets if ds.Modality == "MR"]
    if how == "ImageOrientationPatient of 1 value":
        for ds in mr:
            ds.ImageOrientationPatient = [1.0]
    elif how == "PixelSpacing 0":
        for ds in mr:
            ds.PixelSpacing = [0, 0]
    elif how == "truncated PixelData":
        t2w[len(t2w) // 2].PixelData = t2w[len(t2w) // 2].PixelData[: len(t2w[0].PixelData) // 3]
    elif how == "0-byte PixelData":
        t2w[len(t2w) // 2].PixelData = b""
    elif how == "DWI series missing":
        dwi_uid = study.series[Sequence.DWI][0].SeriesInstanceUID
        datasets = [ds for ds in datasets if ds.get("SeriesInstanceUID") != dwi_uid]
    elif how == "modality CT":
        for ds in mr:
            ds.Modality = "CT"
    elif how == "T2W slices at one position":
        for ds in t2w:
            ds.ImagePositionPatient = list(t2w[0].ImagePositionPatient)
    else:
        raise ValueError(f"unknown damage {how!r}")
    return datasets


MALFORMED = (
    "ImageOrientationPatient of 1 value",
    "PixelSpacing 0",
    "truncated PixelData",
    "0-byte PixelData",
    "DWI series missing",
    "modality CT",
    "T2W slices at one position",
)


def malformed(root: Path, artifact: tuple[Path, str], details: list[list[object]]) -> Row:
    orthanc = start_orthanc(root / "orthanc", OrthancOptions(name="chaos-malformed"))
    node = Node(root / "node", orthanc, artifact)
    try:
        node.start()
        # Site 1 (small): every series has 24 slices.
        bad = [render_study(site_profile(1, small=True), 50 + n, 21) for n in range(len(MALFORMED))]
        good = _studies(0, 2, seed=22)
        expected = {s.identity.study_instance_uid: FAILED for s in bad} | {
            s.identity.study_instance_uid: DONE for s in good
        }
        with ReadyWatch(node) as watch:
            for study, how in zip(bad, MALFORMED, strict=True):
                _upload(_damage(study, how), orthanc)
            for study in good:
                _upload(study_datasets(study), orthanc)
            finished = _wait(_finished(node, expected), FINISH_S)
        row = tally(Row("1. malformed studies mixed into good ones"), node, orthanc, expected)
        by_uid = {job["study_instance_uid"]: job for job in node.jobs()}
        for study, how in zip(bad, MALFORMED, strict=True):
            job = by_uid.get(study.identity.study_instance_uid, {})
            reason = str(job.get("reason", "")).replace("|", "/")
            details.append([how, job.get("state", "no job"), job.get("failure_kind", ""), reason[:110]])
        slices = len(bad[-1].series[Sequence.T2W])
        row.note = f"{len(bad)} malformed ({slices} T2W slices at one position) + {len(good)} good; " + (
            "/ready stayed ready" if not watch.not_ready_samples() else f"/ready not ready {watch.not_ready_samples()}x"
        )
        if not finished:
            row.note += f"; not finished after {FINISH_S:.0f} s"
        return row
    finally:
        node.stop()
        orthanc.stop()


# -- 2. kill -9 of the node ------------------------------------------------------------------------------------


def node_killed(root: Path, artifact: tuple[Path, str]) -> tuple[Row, Node]:
    orthanc = start_orthanc(root / "orthanc", OrthancOptions(name="chaos-kill"))
    node = Node(root / "node", orthanc, artifact)
    try:
        node.start()
        studies = _studies(0, 6, seed=23)
        expected = {s.identity.study_instance_uid: DONE for s in studies}
        for study in studies:
            _upload(study_datasets(study), orthanc)
        _wait(lambda: node.count(DONE) >= 1 and node.count("running", "queued") >= 1, FINISH_S, 0.1)
        in_flight = node.count("running", "queued")
        done_before = node.count(DONE)
        node.kill()
        restarted = time.monotonic()
        node.start()
        with ReadyWatch(node) as watch:
            ready = watch.wait(restarted, "ready", 60)
            finished = _wait(_finished(node, expected), FINISH_S)
        row = tally(Row("2. kill -9 of the node mid-batch, restart"), node, orthanc, expected)
        row.recovered_s = f"{ready[0]:.1f} (restart -> ready)" if ready else "not in 60 s"
        row.note = f"killed with {done_before} done, {in_flight} queued/running"
        if not finished:
            row.note += f"; not finished after {FINISH_S:.0f} s"
        return row, node
    finally:
        node.stop()
        orthanc.stop()


# -- 3. Orthanc SIGKILLed inside StableAge -----------------------------------------------------------------------


def orthanc_killed(root: Path, artifact: tuple[Path, str]) -> Row:
    stable_age_s = 4
    orthanc = start_orthanc(root / "orthanc", OrthancOptions(name="chaos-orthanc", stable_age_s=stable_age_s))
    node = Node(root / "node", orthanc, artifact, "reconcile_quiet_s = 4.0\nreconcile_interval_s = 1.0")
    try:
        node.start()
        first, *lost = _studies(0, 3, seed=24)
        expected = {s.identity.study_instance_uid: DONE for s in (first, *lost)}
        _upload(study_datasets(first), orthanc)
        _wait(lambda: node.count(DONE) >= 1, FINISH_S)
        with ReadyWatch(node) as watch:
            for study in lost:
                _upload(study_datasets(study), orthanc)
            orthanc.kill()  # inside StableAge: the StableStudy events die with it
            killed = time.monotonic()
            reported = watch.wait(killed, "not-ready", 20, "Orthanc")
            orthanc.restart()
            restarted = time.monotonic()
            recovered = watch.wait(restarted, "ready", 60)
            finished = _wait(_finished(node, expected), FINISH_S)
            finished_s = time.monotonic() - restarted
        row = tally(Row("3. Orthanc SIGKILLed inside StableAge, restarted"), node, orthanc, expected)
        row.reported_s = f"{reported[0]:.1f}" if reported else "not in 20 s"
        row.recovered_s = f"{recovered[0]:.1f}" if recovered else "not in 60 s"
        row.note = (
            f"StableAge {stable_age_s} s, {len(lost)} studies uploaded just before the kill; "
            + (f"all done {finished_s:.0f} s after the restart" if finished else f"not finished in {FINISH_S:.0f} s")
            + (
                "; log: never got StableStudy"
                if "never got StableStudy" in node.log.read_text(errors="replace")
                else ""
            )
        )
        return row
    finally:
        node.stop()
        orthanc.stop()


# -- 4. the state disk fills up ---------------------------------------------------------------------------------


def _mount_wrapper(state_dir: Path, image: Path) -> tuple[list[str], str] | None:
    """A command prefix that runs the node in a private mount namespace with ``state_dir`` on a small
    filesystem, and what it is; None when neither a tmpfs nor a loop-mounted ext4 image can be mounted."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmpfs = f"mount -t tmpfs -o size={STATE_DISK_MB}m radfed-chaos {state_dir}"
    loop = f"mount -o loop {image} {state_dir}"
    candidates = [(tmpfs, f"tmpfs {STATE_DISK_MB} MB")]
    try:
        subprocess.run(["truncate", "-s", f"{STATE_DISK_MB}M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        candidates.append((loop, f"loop-mounted ext4 {STATE_DISK_MB} MB"))
    except (OSError, subprocess.CalledProcessError):
        pass
    for mount, what in candidates:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", mount], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mount} && exec "$@"', "sh"], what
    return None


def _in_namespace(node: Node, command: str) -> subprocess.CompletedProcess[bytes]:
    assert node.process is not None
    return subprocess.run(["nsenter", "-t", str(node.process.pid), "-m", "sh", "-c", command], capture_output=True)


def disk_full(root: Path, artifact: tuple[Path, str]) -> Row:
    row = Row("4. state disk filled while studies arrive, freed")
    orthanc = start_orthanc(root / "orthanc", OrthancOptions(name="chaos-disk"))
    node = Node(root / "node", orthanc, artifact, "ledger_backup_interval_s = 2.0\nledger_backups = 2")
    wrapper = _mount_wrapper(node.state_dir, root / "state.img")
    if wrapper is None:
        orthanc.stop()
        row.note = "NOT MEASURED: neither a tmpfs nor a loop-mounted ext4 image could be mounted (unshare -m)"
        return row
    try:
        node.start(wrapper[0])
        first, *later = _studies(0, 4, seed=25)
        expected = {s.identity.study_instance_uid: DONE for s in (first, *later)}
        _upload(study_datasets(first), orthanc)
        _wait(lambda: node.count(DONE) >= 1, FINISH_S)
        fill = node.state_dir / "filler"
        with ReadyWatch(node) as watch:
            _in_namespace(node, f"dd if=/dev/zero of={fill} bs=64k 2>/dev/null; sync")
            filled = time.monotonic()
            free = _in_namespace(node, f"df -k {node.state_dir} | tail -1").stdout.decode().split()
            for study in later:
                _upload(study_datasets(study), orthanc)
            reported = watch.wait(filled, "not-ready", 45)
            time.sleep(max(0.0, filled + 15 - time.monotonic()))  # the studies reach the node while it is full
            jobs_while_full = node.count(DONE, FAILED, "queued", "running")
            _in_namespace(node, f"rm -f {fill}")
            freed = time.monotonic()
            recovered = watch.wait(freed, "ready", 60)
            finished = _wait(_finished(node, expected), FINISH_S)
        tally(row, node, orthanc, expected)
        backups = node.state_dir / "backups"
        copies = len(_in_namespace(node, f"ls {backups}/*.sqlite").stdout.split())
        partial = [int(size) for size in _in_namespace(node, f"stat -c %s {backups}/*.partial").stdout.split()]
        row.reported_s = f"{reported[0]:.1f}" if reported else "not in 45 s"
        row.recovered_s = f"{recovered[0]:.1f}" if recovered else "not in 60 s"
        problem = reported[1][0][:80].replace("|", "/") if reported and reported[1] else ""
        row.note = (
            f"{wrapper[1]}, {free[3] if len(free) > 3 else '?'} kB left after the fill; "
            f"{jobs_while_full} jobs by the free; /ready: {problem!r}; backups/ at the end: "
            f"{copies} ledger copies, {len(partial)} .partial files ({sum(partial) // 1024} kB) left by failed copies"
        )
        if not finished:
            row.note += f"; not finished {FINISH_S:.0f} s after the free"
        return row
    finally:
        node.stop()
        orthanc.stop()


# -- 5. a damaged ledger ------------------------------------------------------------------------------------------


def damaged_ledger(node: Node) -> Row:
    """Scribble over every page of a stopped node's ledger; ``radfed serve`` must refuse to start."""
    ledger = node.state_dir / "ledger.sqlite"
    row = Row("5. ledger scribbled over while stopped, restart")
    data = bytearray(ledger.read_bytes())
    page = 4096
    for offset in range(page + 100, len(data), page):  # page 1 holds the header and schema: left intact
        data[offset : offset + 200] = b"\xa5" * 200
    ledger.write_bytes(bytes(data))
    started = time.monotonic()
    try:
        result = subprocess.run(node.argv(), env=node.env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        row.note = "radfed serve started on a damaged ledger (still running after 120 s)"
        return row
    message = next((line for line in result.stderr.splitlines() if str(ledger) in line), "")
    row.reported_s = f"{time.monotonic() - started:.1f} (exit {result.returncode})"
    restore = "yes" if "newest backup" in result.stderr else "NO"  # quick_check's lines may split the message
    row.note = f"exit code {result.returncode}; names the file: {'yes' if message else 'NO'}; says how to restore: " + (
        f"{restore}: {message.replace(str(node.workdir), '<node>')[:100]}..."
        if message
        else result.stderr.strip()[-200:]
    )
    return row


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="radfed-chaos-") as tmp:
        root = Path(tmp)
        synthesize_to_folder(root / "train", sites=2, studies_per_site=2, seed=4, small=True)
        outcome = train_local_artifact(
            task=None, sources=[str(root / "train")], out=root / "artifact", steps=6, version="0.0.1"
        )
        identity = outcome.artifact.identity
        artifact = (outcome.artifact.folder, f"{identity.name}:{identity.version}")
        details: list[list[object]] = []
        rows = [malformed(root / "malformed", artifact, details)]
        killed, stopped_node = node_killed(root / "kill", artifact)
        rows += [killed, orthanc_killed(root / "orthanc-kill", artifact), disk_full(root / "disk", artifact)]
        rows.append(damaged_ledger(stopped_node))
    table(
        "chaos: a real radfed serve process beside a real Orthanc under faults (small synthetic studies, "
        f"StableAge 2 s unless noted; whole run {time.monotonic() - started:.0f} s)",
        [
            "scenario",
            "sent",
            "as expected",
            "done once",
            "failed w/ reason",
            "lost (0)",
            "duplicated (0)",
            "stalled (0)",
            "/ready reported s",
            "/ready recovered s",
            "note",
        ],
        [row.cells() for row in rows],
        COMMAND,
    )
    table(
        "chaos scenario 1: each malformed study's job (goal: failed, with a reason)",
        ["damage", "state", "failure kind", "reason"],
        details,
        COMMAND,
    )
