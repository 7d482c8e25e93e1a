"""A site's federated rounds beside a node, in a process of their own: ``python -m bench.site_training``.

Runs what a site worker runs for each round (``federation.site.rounds.train_round``: cohort, evaluation of the
incoming model, local training, DP-SGD by default) with the device arbiter of the node's state folder, one
torch thread, round after round until stopped. Each step's turn on the device is appended to a JSON-lines
record (``entered``, ``left``: wall clock once the turn was granted and after the step; ``cpu``: this
process's CPU seconds in the step; ``paused``: seconds it waited for clinical work), so that ``bench node``
can time steps beside clinical jobs and the arbiter's kill test can see a step in flight."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from radfed.inference.model.arbiter import DeviceArbiter, DevicePolicy


class RecordingArbiter(DeviceArbiter):
    """The node's arbiter, unchanged, with each training step's turn written down."""

    def __init__(self, folder: Path, policy: DevicePolicy, record: Path) -> None:
        super().__init__(folder, policy)
        self.record = record.open("a", buffering=1)

    @contextmanager
    def training_step(self) -> Iterator[list[float]]:
        with super().training_step() as paused:
            entered, cpu = time.time(), time.process_time()
            yield paused
        left, cpu = time.time(), time.process_time() - cpu
        self.record.write(json.dumps({"entered": entered, "left": left, "cpu": cpu, "paused": sum(paused)}) + "\n")


def read_steps(record: Path) -> list[dict[str, float]]:
    """The steps written so far (a line being written is left for the next read)."""
    if not record.exists():
        return []
    steps = []
    for line in record.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.site_training", description=__doc__)
    parser.add_argument("--data", required=True, help="the site's studies (a folder written by radfed synth)")
    parser.add_argument("--state-dir", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--node-state-dir", type=Path, required=True, help="the node's state folder (the arbiter)")
    parser.add_argument("--policy", default=DevicePolicy.CLINICAL_FIRST.value, choices=[p.value for p in DevicePolicy])
    parser.add_argument("--record", type=Path, required=True, help="JSON lines, one per training step")
    parser.add_argument("--local-steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=None, help="DP budget (default: the run config's)")
    args = parser.parse_args(argv)

    # Heavy imports after parsing: --help stays quick.
    from radfed.federation.job.planning import job_plan
    from radfed.federation.job.run_config import RunConfig
    from radfed.federation.learning.cohort import source_fingerprints
    from radfed.federation.learning.train_local import set_threads
    from radfed.federation.learning.training import new_model
    from radfed.federation.site import rounds as site_code
    from radfed.federation.site.config import SiteConfig
    from radfed.inference.model.plan import DatasetFingerprint
    from radfed.inference.model.taskspec import load_task_spec

    set_threads(1)
    epsilon = RunConfig().epsilon if args.epsilon is None else args.epsilon
    # The job's plan as the coordinator makes it from this site's fingerprint (a private job plans its batches).
    prints = {"bench-site": DatasetFingerprint.from_studies(source_fingerprints(load_task_spec(), [args.data], None))}
    plan = job_plan(load_task_spec(), prints, private=epsilon > 0)
    arbiter = RecordingArbiter(args.node_state_dir, DevicePolicy(args.policy), args.record)

    @dataclass(frozen=True)
    class RecordingSite(SiteConfig):
        def arbiter(self) -> DeviceArbiter:
            return arbiter

    site = RecordingSite(
        name="bench-site",
        data=(args.data,),
        state_dir=args.state_dir,
        node_state_dir=args.node_state_dir,
        device_policy=arbiter.policy,
    )
    config: dict[str, object] = {
        "job": "bench-beside-the-node",
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "epsilon": epsilon,
        "plan": plan.to_json(),
    }
    spec = site_code.job_spec(site_code.RoundPlan.from_config(config))
    arrays = site_code.model_to_arrays(new_model(spec, seed=0))
    for server_round in range(1, args.rounds + 1):
        plan_of_round = site_code.RoundPlan.from_config(config | {"server-round": server_round})
        arrays, metrics = site_code.train_round(site, plan_of_round, arrays)
        print(json.dumps({"round": server_round, **metrics}), flush=True)


if __name__ == "__main__":
    main()
