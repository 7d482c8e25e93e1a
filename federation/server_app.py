"""The Flower ServerApp: rounds of site training, weighted federated averaging, a checkpoint and a metrics
line per round, and the final ONNX artifact with its model card. Thin over radfed.federation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from radfed.federation import records
from radfed.federation.aggregation import SiteUpdate, aggregate
from radfed.federation.export import export_artifact
from radfed.federation.site import arrays_to_model, model_to_arrays
from radfed.federation.training import new_model
from radfed.inference.findings import ModelIdentity
from radfed.inference.taskspec import load_task_spec

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    task = str(cfg.get("task", "")) or None
    spec = load_task_spec(task)
    rounds = int(cfg["num-server-rounds"])
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    job = str(cfg.get("job", "radfed-job"))
    min_sites = int(cfg.get("min-sites", 1))
    arrays = model_to_arrays(new_model(spec))
    checkpoint = out / "checkpoint.npz"
    start_round = 1
    if checkpoint.is_file():  # a restarted coordinator resumes the job
        saved = np.load(checkpoint)
        arrays = [saved[f"a{i}"] for i in range(len(arrays))]
        start_round = int(saved["round"]) + 1
    studies_per_site: dict[str, int] = {}
    for server_round in range(start_round, rounds + 1):
        started = time.perf_counter()
        while len(nodes := list(grid.get_node_ids())) < min_sites:
            time.sleep(1)
        config = ConfigRecord(
            {
                "job": job,
                "task": task or "",
                "server-round": server_round,
                "num-rounds": rounds,
                "local-steps": int(cfg["local-steps"]),
                "epsilon": float(cfg.get("epsilon", 0.0)),
                "delta": float(cfg.get("delta", 1e-5)),
            }
        )
        content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
        messages = [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n, group_id=str(server_round))
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=float(cfg.get("round-timeout", 600))))
        updates: list[SiteUpdate] = []
        round_metrics: dict[str, dict[str, float | str]] = {}
        for reply in replies:
            if reply.has_error():
                round_metrics[str(reply.metadata.src_node_id)] = {"error": str(reply.error.reason)[:200]}
                continue
            metrics = records.metrics(reply.content)
            weight = int(metrics.get("num-examples", 1))
            updates.append(SiteUpdate(str(reply.metadata.src_node_id), records.arrays(reply.content), weight))
            round_metrics[str(reply.metadata.src_node_id)] = dict(metrics)
            studies_per_site[str(reply.metadata.src_node_id)] = int(metrics.get("studies_usable", weight))
        if len(updates) < min_sites:
            raise RuntimeError(f"round {server_round}: {len(updates)} site update(s), quorum is {min_sites}")
        outcome = aggregate(arrays, updates, records.text(cfg, "aggregation", "fedavg"))
        arrays = outcome.arrays
        np.savez(checkpoint, round=np.array(server_round), **{f"a{i}": a for i, a in enumerate(arrays)})  # type: ignore[arg-type]
        with (out / "metrics.jsonl").open("a") as handle:
            line = {
                "round": server_round,
                "seconds": time.perf_counter() - started,
                "sites": round_metrics,
                "aggregated": list(outcome.used),
                "flagged": [{"site": f.site, "reason": f.reason} for f in outcome.flags],
            }
            handle.write(json.dumps(line) + "\n")
    model = arrays_to_model(spec, arrays)
    export_artifact(
        model,
        spec,
        out / "artifact",
        ModelIdentity(spec.name, str(cfg.get("model-version", "1.0.0"))),
        provenance={
            "training": "federated",
            "rounds": rounds,
            "studies_per_site": studies_per_site,
            "differential_privacy": {
                "epsilon_budget": float(cfg.get("epsilon", 0.0)),
                "delta": float(cfg.get("delta", 1e-5)),
            }
            if float(cfg.get("epsilon", 0.0)) > 0
            else None,
        },
    )
