"""The ``radfed`` command.

Exit status: 0 success, 1 operational failure (Orthanc unreachable, ...), 2 usage error,
3 the input is at fault (a DICOM object or series that cannot be used). Every RadfedError is
translated here, once; handlers import their heavy dependencies lazily so ``radfed --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radfed.inference.errors import DicomInputError, RadfedError

if TYPE_CHECKING:
    from radfed.inference.orthanc.client import OrthancEndpoint

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3

Handler = Callable[[argparse.Namespace], int]


def orthanc_endpoint_from_url(url: str) -> OrthancEndpoint:
    from radfed.inference.orthanc.client import OrthancEndpoint

    return OrthancEndpoint.from_url(url)


def _cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radfed.inference.orthanc.client import OrthancClient
    from radfed.inference.testing.synthetic.sites import site_profile
    from radfed.inference.testing.synthetic.writer import (
        iter_site_studies,
        label_row,
        upload_study,
        write_labels,
        write_study,
    )

    if args.orthanc and len(args.orthanc) != args.sites:
        print(
            f"radfed synth: give one --orthanc per site ({args.sites}), got {len(args.orthanc)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.orthanc and args.out is None:
        print("radfed synth: give --out DIR or --orthanc URL", file=sys.stderr)
        return EXIT_USAGE
    total = args.sites * args.studies_per_site
    with tqdm(total=total, desc="synthetic studies", unit="study", disable=args.quiet) as progress:
        for index in range(1, args.sites + 1):
            site = site_profile(index, small=args.small)
            rows = []
            client = None
            if args.orthanc:
                client = OrthancClient(orthanc_endpoint_from_url(args.orthanc[index - 1]))
            for study in iter_site_studies(site, args.studies_per_site, args.seed):
                if args.out is not None:
                    write_study(study, args.out / site.name)
                if client is not None:
                    upload_study(study, client)
                rows.append(label_row(study))
                progress.update()
            if args.out is not None:
                write_labels(rows, args.out / site.name / "labels.csv")
            if client is not None:
                client.close()
    return EXIT_OK


def _cmd_volume(args: argparse.Namespace) -> int:
    from radfed.inference.dicom.series import load_series_folder

    volume = load_series_folder(args.series_dir)
    report: dict[str, Any] = {
        "shape": list(volume.shape),
        "spacing": [round(v, 6) for v in volume.spacing],
        "affine": [[round(float(v), 6) for v in row] for row in volume.affine],
        "frame_of_reference_uid": volume.frame_of_reference_uid,
        "index_order": ["slice", "row", "column"],
        "coordinates": "LPS",
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"shape (slice,row,column): {report['shape']}  spacing mm: {report['spacing']}")
        for row in report["affine"]:
            print("  " + "  ".join(f"{v:12.5f}" for v in row))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from radfed.dicom_sr.validation import validate_file

    failed = 0
    for path in args.files:
        report = validate_file(path)
        print(report.line(), flush=True)
        failed += not report.passed
    if failed:
        print(f"{failed} of {len(args.files)} file(s) failed", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _cmd_train(args: argparse.Namespace) -> int:
    if not args.local:
        print(
            "radfed train: only --local training runs from here; federated jobs start from the coordinator",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from tqdm import tqdm

    from radfed.federation.learning.train_local import train_local_artifact

    with tqdm(total=0, desc="training", unit="step", disable=args.quiet) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.refresh()

        outcome = train_local_artifact(
            task=args.task,
            sources=args.data,
            out=args.out,
            labels=args.labels,
            steps=args.steps,
            threads=args.threads,
            version=args.version,
            cache_dir=args.cache,
            seed=args.seed,
            progress=progress,
        )
    print(outcome.summary())
    return EXIT_OK


def _cmd_infer(args: argparse.Namespace) -> int:
    from radfed.dicom_sr.outputs import build_results
    from radfed.dicom_sr.profile import OutputProfile
    from radfed.inference.dicom.study_source import FolderStudy
    from radfed.inference.model.artifact import load_artifact
    from radfed.inference.model.device import Device, RuntimeSettings
    from radfed.inference.model.runtime import OnnxModel
    from radfed.inference.pipeline.infer_study import analyse_study
    from radfed.inference.timing import StageTimer

    artifact = load_artifact(args.model)
    model = OnnxModel(artifact, RuntimeSettings(device=Device(args.device)))
    timer = StageTimer()
    analysis = analyse_study(FolderStudy(args.study_dir), model, timer)
    profile = OutputProfile(seg_encoding=args.seg_encoding, key_images=args.key_images)
    objects = build_results(analysis.result, profile, timer=timer)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in objects.datasets():
        path = args.out / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    result = analysis.result
    summary = {
        "model": artifact.key,
        "provider": model.provider,
        "device": model.device.as_dict(),
        "study_probability": round(result.study_finding.probability, 4),
        "category": result.study_finding.category.meaning,
        "lesions": [
            {
                "number": lesion.number,
                "probability": round(lesion.probability, 4),
                "volume_mm3": round(lesion.measurements.volume_mm3, 1),
                "long_axis_mm": round(lesion.measurements.long_axis_mm, 1),
            }
            for lesion in result.lesions
        ],
        "selection": analysis.loaded.selection.describe(),
        "timings_s": timer.as_dict(),
        "written": [str(p) for p in written],
    }
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def _cmd_fp16(args: argparse.Namespace) -> int:
    from radfed.federation.learning.export import add_fp16
    from radfed.inference.model.artifact import load_artifact

    artifact = add_fp16(load_artifact(args.artifact))
    error = artifact.provenance["onnx_fp16_max_abs_error"]
    print(f"{artifact.key}: {artifact.fp16_path} (max |float32 - float16| on a sample: {error:.4f})")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    import uvicorn

    from radfed.plugin.node.api import create_app
    from radfed.plugin.node.config import NodeRole, load_config
    from radfed.plugin.node.service import NodeService

    config = load_config(args.config)
    if args.role is not None:
        config = dataclasses.replace(config, role=NodeRole(args.role))
    service = NodeService(config)
    for artifact in args.install_model or []:
        installed = service.registry.install(artifact)
        print(f"installed {installed.key}", file=sys.stderr)
    if args.activate:
        name, _, version = args.activate.partition(":")
        service.activate(name, version)
    service.start()
    if args.reprocess_since:
        print(f"reprocessing {service.reprocess_since(args.reprocess_since)} studies", file=sys.stderr)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service), host=config.api_host, port=config.api_port, log_level="warning", access_log=False
        )
    )
    stopped = threading.Event()

    def shutdown(*_: object) -> None:
        stopped.set()
        server.should_exit = True

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    print(
        f"radfed node ({config.role}): API on http://{config.api_host}:{config.api_port}, Orthanc {config.orthanc.url}",
        file=sys.stderr,
        flush=True,
    )
    server.run()
    service.stop()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radfed", description="Federated radiology AI node beside an Orthanc PACS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="generate synthetic multi-hospital prostate mp-MRI studies")
    synth.add_argument("--sites", type=int, default=3)
    synth.add_argument("--studies-per-site", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", type=Path, help="write DIR/site-<i>/study-<n>/ folders and labels.csv")
    synth.add_argument(
        "--orthanc",
        action="append",
        metavar="URL",
        help="upload to this Orthanc (repeat once per site); credentials as http://user:password@host:port",
    )
    synth.add_argument("--small", action="store_true", help="half the in-plane matrix (fast tests)")
    synth.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_cmd_synth)

    volume = commands.add_parser("volume", help="load one DICOM series folder as a volume and print its geometry")
    volume.add_argument("series_dir", type=Path)
    volume.add_argument("--json", action="store_true", help="print JSON (shape, spacing, 4x4 index-to-LPS affine)")
    volume.set_defaults(handler=_cmd_volume)
    train = commands.add_parser("train", help="train the task's model (--local: on this machine's data)")
    train.add_argument("--local", action="store_true", help="train here, without the federation")
    train.add_argument("--task", help="task spec file or shipped name (default: prostate_mpmri)")
    train.add_argument("--data", action="append", required=True, metavar="DIR_OR_ORTHANC_URL",
                       help="synth folder (root, site or study), an MSD / nnU-Net raw dataset folder "
                            "(dataset.json, imagesTr/, labelsTr/) or an Orthanc URL; repeatable")  # fmt: skip
    train.add_argument("--labels", type=Path, help="labels CSV for Orthanc sources")
    train.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    train.add_argument("--steps", type=int, help="override the recipe's training steps")
    train.add_argument("--threads", type=int, help="torch threads (default: the recipe's; 0: the cores not busy)")
    train.add_argument("--version", default="0.1.0", help="model version written in the artifact")
    train.add_argument("--cache", type=Path, help="preprocessed-tensor cache folder")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("-q", "--quiet", action="store_true")
    train.set_defaults(handler=_cmd_train)

    infer = commands.add_parser("infer", help="run a model artifact on a study folder and write SEG/SR files")
    infer.add_argument("study_dir", type=Path)
    infer.add_argument("--model", type=Path, required=True, help="model artifact folder")
    infer.add_argument("--out", type=Path, required=True)
    infer.add_argument("--seg-encoding", default="BINARY", choices=["BINARY", "LABELMAP"])
    infer.add_argument("--key-images", action="store_true", help="also write Secondary Capture key images")
    infer.add_argument(
        "--device", default="auto", choices=["cpu", "cuda", "auto"], help="as [inference] device (default auto)"
    )
    infer.set_defaults(handler=_cmd_infer)

    fp16 = commands.add_parser(
        "fp16", help="add a float16 copy of an artifact's model for GPU nodes (float32 kept, parity checked)"
    )
    fp16.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR")
    fp16.set_defaults(handler=_cmd_fp16)

    serve = commands.add_parser("serve", help="run the hospital node beside Orthanc (jobs, write-back, HTTP API)")
    serve.add_argument("--config", type=Path, help="node configuration (TOML); RADFED_* variables override")
    serve.add_argument(
        "--install-model", type=Path, action="append", metavar="ARTIFACT_DIR", help="install an artifact first"
    )
    serve.add_argument("--activate", metavar="NAME:VERSION", help="activate this installed model first")
    serve.add_argument(
        "--reprocess-since",
        metavar="DATE",
        help="examine again every study that became stable in Orthanc since DATE (YYYYMMDD[THHMMSS]); "
        "a new ledger otherwise starts from Orthanc's current changes",
    )
    serve.add_argument(
        "--role",
        choices=["coordinator", "worker", "all"],
        help="coordinator: follow Orthanc and queue jobs; worker: run queued jobs (any number, on any machine sharing "
        "a PostgreSQL database_url); all (the default, [node] role): both in one process",
    )
    serve.set_defaults(handler=_cmd_serve)

    validate = commands.add_parser(
        "validate", help="check SEG/SR files with dciodvfy, strict pydicom/highdicom reading and dcmqi"
    )
    validate.add_argument("files", type=Path, nargs="+", metavar="FILE")
    validate.set_defaults(handler=_cmd_validate)

    from radfed.plugin.commands import config as config_command  # argparse only; lazy handlers
    from radfed.plugin.commands import demo
    from radfed.plugin.commands import experiment as experiment_command
    from radfed.plugin.commands import federation as federation_command
    from radfed.plugin.commands import init as init_command
    from radfed.plugin.tools import viewer

    federation_command.add_parser(commands)
    experiment_command.add_parser(commands)
    demo.add_parser(commands)
    viewer.add_parser(commands)
    config_command.add_parser(commands)
    init_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except DicomInputError as exc:
        print(f"radfed {args.command}: bad input: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RadfedError as exc:
        print(f"radfed {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
