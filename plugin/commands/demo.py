"""``radfed demo``: the whole product on this machine. Three hospitals (each a real Orthanc and its radfed
node), a coordinator, a federated job (TLS, node authentication, DP, harmonisation), the model rolled out
and activated, new studies sent to hospital 1 until their SEG and SR are stored, then a report."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radfed.plugin.commands.federation import find_app_dir


@dataclass
class Node:
    """One hospital's ``radfed serve`` process, beside its Orthanc."""

    name: str
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        response = requests.request(
            method, self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10, **kwargs
        )
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_node(site: Any, workdir: Path) -> Node:
    from radfed.inference.testing.orthanc_server import free_port

    port = free_port()
    folder = workdir / site.name / "node"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "node.toml"
    config.write_text(
        f'[orthanc]\nurl = "{site.orthanc.url}"\nusername = "{site.orthanc.options.username}"\n\n'
        f'[node]\nstate_dir = "{folder / "state"}"\nmodels_dir = "{site.models_dir}"\nconcurrency = 2\n\n'
        f"[api]\nport = {port}\n"
    )
    token = secrets.token_urlsafe(16)
    env = dict(
        os.environ,
        RADFED_ORTHANC_PASSWORD=site.orthanc.options.password,
        RADFED_API_TOKEN=token,
        ORT_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
    )
    log = folder / "node.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "radfed.plugin", "serve", "--config", str(config)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    import requests

    node = Node(site.name, f"http://127.0.0.1:{port}", token, process, log)
    deadline = time.monotonic() + 90
    while True:
        try:
            node.call("GET", "/health")
            return node
        except requests.RequestException:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{site.name}: radfed serve did not start:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.5)


def wait_for_job(out: Path, process: subprocess.Popen[str], rounds: int, quiet: bool) -> None:
    from tqdm import tqdm

    from radfed.federation.coordinator.checkpoint import read_metrics

    with tqdm(total=rounds + 2, desc="federated job", unit="step", disable=quiet) as bar:
        while process.poll() is None:
            lines = read_metrics(out)
            done = sum(1 for m in lines if "round" in m) + sum(
                m.get("stage") in ("harmonisation", "final") for m in lines
            )
            bar.update(max(0, done - bar.n))
            time.sleep(1)
        bar.update(max(0, rounds + 2 - bar.n))


@dataclass(frozen=True)
class NewStudyResult:
    """One of hospital 1's new studies: radfed's SEG as stored in Orthanc against the synthetic truth."""

    study: str  # the last digits of the StudyInstanceUID
    dice: float
    lesions_true: int
    lesions_found: int
    false_positive_components: int
    largest_false_positive_mm3: float
    smallest_true_lesion_mm3: float

    def row(self) -> list[object]:
        return [
            self.study,
            round(self.dice, 3),
            f"{self.lesions_found} / {self.lesions_true}",
            self.false_positive_components,
            round(self.largest_false_positive_mm3, 1),
            round(self.smallest_true_lesion_mm3, 1),
        ]


NEW_STUDY_HEADER = (
    "study",
    "Dice",
    "lesions found / true",
    "false-positive components",
    "largest false positive (mm3)",
    "smallest true lesion (mm3)",
)


def assess_new_studies(site: Any, studies: list[Any], limit: int = 3) -> tuple[list[NewStudyResult], list[Any]]:
    """Each new study's Dice and false positives (radfed's stored SEG against the study's synthetic truth, on
    the T2W grid), and T2W slices with radfed's SEG drawn over them for the first ``limit``."""
    import numpy as np
    from scipy import ndimage

    from radfed.inference.dicom.seg_reader import read_segmentation
    from radfed.inference.dicom.study_source import OrthancStudy
    from radfed.inference.model.taskspec import load_task_spec
    from radfed.inference.orthanc.client import OrthancClient
    from radfed.inference.pipeline.preprocess import load_study
    from radfed.plugin.tools.report import SampleSlice

    spec = load_task_spec(None)
    connectivity = np.ones((3, 3, 3), dtype=bool)
    results: list[NewStudyResult] = []
    samples: list[SampleSlice] = []
    with OrthancClient(site.orthanc.endpoint) as client:
        for study in studies:
            uid = study.identity.study_instance_uid
            study_id = client.find_study(uid)
            if study_id is None:
                continue
            loaded = load_study(OrthancStudy(client, study_id), spec)
            truth_seg = read_segmentation(study.reference_seg, loaded.reference)
            truth = np.zeros(loaded.reference.shape, dtype=bool)
            for segment in truth_seg.segments:
                if spec.segmentation_labels.is_lesion(segment.property_type):
                    truth |= truth_seg.masks[segment.segment_number]
            predicted = np.zeros_like(truth)
            for series_id in client.get_json(f"/studies/{study_id}/series?expand=false") or []:
                series_id = series_id if isinstance(series_id, str) else series_id["ID"]
                tags = client.series(series_id).get("MainDicomTags", {})
                if tags.get("Modality") != "SEG" or not str(tags.get("SeriesDescription", "")).startswith("AI "):
                    continue  # the radiologist's reference SEG is the truth, not a result
                for ds in client.series_datasets(series_id):
                    seg = read_segmentation(ds, loaded.reference)
                    for segment in seg.segments:
                        predicted |= seg.masks[segment.segment_number]
            voxel_mm3 = float(np.prod(loaded.reference.spacing))
            found, count = ndimage.label(predicted, structure=connectivity)
            true_lesions, true_count = ndimage.label(truth, structure=connectivity)
            touched = set(np.unique(found[truth]).tolist()) - {0}
            false_sizes = [int((found == c).sum()) for c in range(1, count + 1) if c not in touched]
            true_sizes = [int((true_lesions == c).sum()) for c in range(1, true_count + 1)]
            overlap = float(np.logical_and(predicted, truth).sum())
            total = float(predicted.sum() + truth.sum())
            results.append(
                NewStudyResult(
                    uid[-12:],
                    2 * overlap / total if total else 1.0,
                    true_count,
                    len(set(np.unique(true_lesions[predicted]).tolist()) - {0}),
                    len(false_sizes),
                    max(false_sizes, default=0) * voxel_mm3,
                    min(true_sizes, default=0) * voxel_mm3,
                )
            )
            if len(samples) < limit:
                index = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else loaded.reference.shape[0] // 2
                samples.append(
                    SampleSlice(
                        f"hospital-1, new study {len(samples) + 1}, T2W slice {index + 1}",
                        loaded.reference.array[index],
                        predicted[index],
                        f"radfed's DICOM SEG as stored in Orthanc (red outline); Dice {results[-1].dice:.2f} against "
                        f"the synthetic truth, {results[-1].false_positive_components} false-positive component(s).",
                    )
                )
    return results, samples


def train_base_model(workdir: Path, args: argparse.Namespace, say: Any) -> Path:
    """A base model trained centrally on public studies (synthetic, other patients than the hospitals'):
    with a few studies per hospital, DP-SGD from random weights learns nothing a radiologist could use, so
    the federation fine-tunes this model (the report and the model card say so)."""
    from radfed.federation.learning.train_local import train_local_artifact
    from radfed.inference.testing.synthetic.writer import synthesize_to_folder

    data = workdir / "public-data"
    per_site = max(2, args.base_studies // 2)
    synthesize_to_folder(data, sites=2, studies_per_site=per_site, seed=args.seed + 1000, small=not args.full_size)
    say(f"base model: training {args.base_steps} steps on {2 * per_site} public synthetic studies")
    outcome = train_local_artifact(
        task=None, sources=[str(data)], out=workdir / "base-model", steps=args.base_steps, threads=2, seed=args.seed
    )
    say(outcome.summary().replace("\n", "\n  "))
    return outcome.artifact.folder


def harmonisation_view(federation: Any, reference: dict[str, list[float]] | None) -> list[Any]:
    """Each site's T2W foreground from its cohort cache, with its own scaling vs the federation's."""
    import numpy as np

    from radfed.inference.pipeline.preprocess import Normalization, normalize
    from radfed.plugin.tools.report import SiteIntensities

    views = []
    for site in federation.sites:
        before, after = [], []
        for cached in sorted((site.state_dir / "cache").glob("*.npz"))[:4]:
            t2w = np.load(cached)["raw"][0]
            fg = t2w > np.percentile(t2w, 50)
            before.append(normalize(t2w, Normalization.PERCENTILE)[fg])
            if reference:
                after.append(normalize(t2w, Normalization.LANDMARKS, reference_landmarks=reference["t2w"])[fg])
        if before:
            views.append(
                SiteIntensities(site.name, np.concatenate(before), np.concatenate(after or before).astype(np.float32))
            )
    return views


def _start_viewer(site: Any) -> Any:
    """OHIF for hospital 1 on 127.0.0.1 (when make install fetched it)."""
    from radfed.plugin.tools.viewer import OrthancTarget, ViewerServer, default_dist

    dist = default_dist(Path(find_app_dir(None)).parents[1])
    if not (dist / "index.html").is_file():
        print(f"radfed demo: OHIF not found at {dist} (make install fetches it); no viewer link", file=sys.stderr)
        return None
    target = OrthancTarget(site.orthanc.url, site.orthanc.options.username, site.orthanc.options.password)
    return ViewerServer(dist, target).start()


def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radfed.federation.lab.loopback import FederationOptions, LoopbackFederation
    from radfed.inference.model.artifact import load_artifact
    from radfed.inference.orthanc.client import OrthancClient
    from radfed.inference.testing.synthetic.sites import site_profile
    from radfed.inference.testing.synthetic.study import render_study
    from radfed.inference.testing.synthetic.writer import upload_study
    from radfed.plugin.commands.federation import summarise
    from radfed.plugin.tools.report import write_job_report

    started = time.perf_counter()
    workdir: Path = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    say = (lambda _: None) if args.quiet else (lambda text: print(f"radfed demo: {text}", file=sys.stderr, flush=True))
    federation = LoopbackFederation(
        workdir,
        find_app_dir(None),
        FederationOptions(sites=3, studies_per_site=args.studies_per_site, seed=args.seed, small=not args.full_size),
    )
    nodes: list[Node] = []
    viewer = None
    try:
        say(f"starting 3 hospitals ({args.studies_per_site} synthetic studies each) and a coordinator")
        base = train_base_model(workdir, args, say) if args.base_steps > 0 else None
        federation.start(progress=lambda step: say(f"  {step}"))
        out = workdir / "job"
        config = {
            "num-server-rounds": args.rounds,
            "local-steps": args.local_steps,
            "min-sites": 2,
            "epsilon": args.epsilon,
            "harmonise": True,
            "rollout": True,
            "job": "radfed-demo",
            "model-version": "1.0.0",
            "round-timeout": 600,
        }
        if base is not None:
            config |= {"base-model": str(base), "learning-rate": args.fine_tune_learning_rate}
        say(f"federated job: {args.rounds} rounds, DP epsilon {args.epsilon:g}, TLS + node authentication")
        process = federation.submit(out, config)
        wait_for_job(out, process, args.rounds, args.quiet)
        if not (out / "artifact" / "manifest.json").is_file():
            print(f"radfed demo: the federated job failed:\n{(out / 'run.log').read_text()[-3000:]}", file=sys.stderr)
            return 1
        artifact = load_artifact(out / "artifact")
        print(summarise(out), file=sys.stderr)
        say(f"model {artifact.key} rolled out; starting each hospital's radfed node and activating it")
        for site in federation.sites:
            node = start_node(site, workdir)
            nodes.append(node)
            node.call("POST", f"/models/{artifact.identity.name}/{artifact.identity.version}/activate")
        hospital = federation.sites[0]
        new_studies: list[Any] = []
        with OrthancClient(hospital.orthanc.endpoint) as client:
            number = 100
            while len(new_studies) < args.new_studies:  # new patients with lesions: something for the AI to find
                number += 1
                study = render_study(site_profile(1, small=not args.full_size), number, args.seed + 1)
                if study.phantom.lesions or number > 200:
                    upload_study(study, client)
                    new_studies.append(study)
        new_uids = [study.identity.study_instance_uid for study in new_studies]
        say(f"sent {len(new_uids)} new studies to hospital-1's Orthanc; waiting for SEG + SR")
        pending = set(new_uids)
        deadline = time.monotonic() + 600
        with tqdm(total=len(new_uids), desc="AI results stored", unit="study", disable=args.quiet) as bar:
            while pending and time.monotonic() < deadline:
                for uid in sorted(pending):
                    jobs = nodes[0].call("GET", "/jobs", params={"study_instance_uid": uid})
                    if any(j["state"] in ("done", "failed") for j in jobs):
                        pending.discard(uid)
                        bar.update(1)
                time.sleep(1)
        jobs = [j for uid in new_uids for j in nodes[0].call("GET", "/jobs", params={"study_instance_uid": uid})]
        done = [j for j in jobs if j["state"] == "done"]
        done_uids = {j["study_instance_uid"] for j in done}
        assessed, samples = assess_new_studies(
            hospital, [s for s in new_studies if s.identity.study_instance_uid in done_uids]
        )
        report = write_job_report(
            out,
            workdir / "report",
            title="radfed demo: three hospitals, one federated model",
            intensities=harmonisation_view(federation, artifact.harmonisation),
            samples=samples,
            new_studies=(NEW_STUDY_HEADER, [r.row() for r in assessed]),
            base_model=artifact.provenance.get("base_model"),
        )
        print("\n== radfed demo summary ==")
        for site in federation.sites:
            print(f"{site.name}: Orthanc {site.orthanc.url}  user {site.orthanc.options.username}  "
                  f"password {site.orthanc.options.password}")  # fmt: skip
        print(f"hospital-1: {len(done)} of {len(new_uids)} new studies have radfed SEG + SR in Orthanc")
        for result in assessed:
            print(
                f"  study {result.study}: Dice {result.dice:.2f} against the synthetic truth, lesions found "
                f"{result.lesions_found}/{result.lesions_true}, {result.false_positive_components} false-positive "
                f"component(s) (largest {result.largest_false_positive_mm3:.0f} mm3)"
            )
        if assessed:
            print(f"  mean Dice {sum(r.dice for r in assessed) / len(assessed):.2f}")
        for job in jobs:
            print(f"  study {job['study_instance_uid'][-12:]}: {job['state']} {job.get('reason') or ''}".rstrip())
        print(f"model card: {out / 'model-card.md'}")
        print(f"report:     {report}")
        viewer = _start_viewer(hospital)
        if viewer is not None and done:
            print(
                f"OHIF:       {viewer.study_url(done[0]['study_instance_uid'])}  (hospital-1, a study with AI results)"
            )
        print(f"total {time.perf_counter() - started:.0f} s")
        if len(done) != len(new_uids):
            return 1
        if args.keep:
            print("--keep: hospitals, nodes and coordinator stay up; Ctrl-C stops them", file=sys.stderr)
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if viewer is not None:
            viewer.stop()
        for node in nodes:
            node.stop()
        federation.stop()


def add_parser(commands: Any) -> None:
    demo = commands.add_parser("demo", help="three hospitals, a federated job, rollout and AI results, then a report")
    demo.add_argument("--studies-per-site", type=int, default=8)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--local-steps", type=int, default=20)
    demo.add_argument("--epsilon", type=float, default=8.0)
    demo.add_argument(
        "--base-steps",
        type=int,
        default=400,
        help="train a base model this many steps on public synthetic studies first (0: start at random)",
    )
    demo.add_argument("--base-studies", type=int, default=16, help="public synthetic studies for the base model")
    demo.add_argument("--fine-tune-learning-rate", type=float, default=1e-4,
                      help="the sites' learning rate when fine-tuning the base model")  # fmt: skip
    demo.add_argument("--new-studies", type=int, default=3, help="studies sent to hospital 1 after the rollout")
    demo.add_argument("--full-size", action="store_true", help="full-size studies (slower)")
    demo.add_argument("--seed", type=int, default=21)
    demo.add_argument("--workdir", type=Path, default=Path("radfed-demo"))
    demo.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C")
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(handler=cmd_demo)
