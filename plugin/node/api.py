"""The node's HTTP API (FastAPI): health and readiness, jobs, models, federation alerts, run a study, Prometheus
metrics.

Every route requires the API token (``Authorization: Bearer <token>``); OpenAPI docs at ``/docs``.
RadfedErrors are translated to HTTP answers here, once.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from radfed.federation.job.alerts import UnresolvedAlertsError
from radfed.inference.errors import DicomInputError, OrthancUnavailableError, RadfedError
from radfed.plugin.node.ledger.store import JobStatus
from radfed.plugin.node.service import ORTHANC_ID, NodeService

_bearer = HTTPBearer(auto_error=False)


# What the edge accepts, so that a bad argument is a 422 naming it, never a 500 or an upstream error text.
_UID = r"^[0-9]+(\.[0-9]+)*$"  # DICOM UI: digits and dots, at most 64 characters, no wildcards
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"  # model names and versions: no path separators, no ".."
_JOB_ID = Path(ge=1, le=2**63 - 1)  # SQLite's integer range
_ALERT_ID = r"^[0-9a-f]{16}$"  # federation.alerts.PoisoningAlert.alert_id


class StableStudyNotice(BaseModel):
    orthanc_study_id: str = Field(pattern=f"^{ORTHANC_ID.pattern}$")


def create_app(service: NodeService) -> FastAPI:
    # The OpenAPI document and docs are routes too: served below behind the token.
    app = FastAPI(
        title="radfed node",
        version="1",
        description="Federated radiology AI node beside Orthanc (research use only)",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        token = credentials.credentials if credentials else ""
        if not secrets.compare_digest(token.encode(), service.config.api_token.encode()):
            raise HTTPException(
                status_code=401, detail="missing or wrong API token", headers={"WWW-Authenticate": "Bearer"}
            )

    guarded = [Depends(require_token)]

    @app.exception_handler(RadfedError)
    def _radfed_error(_request: Request, exc: RadfedError) -> JSONResponse:
        status = (
            409  # the model is fine; the node's policy refuses it while its job's alerts are open
            if isinstance(exc, UnresolvedAlertsError)
            else 400
            if isinstance(exc, DicomInputError | ValueError)
            else 503
            if isinstance(exc, OrthancUnavailableError)
            else 500
        )
        # The node's own folders are nobody's business over HTTP: name them, do not show them.
        detail = str(exc)
        for folder, name in ((service.config.models_dir, "<models>"), (service.config.state_dir, "<state>")):
            detail = detail.replace(str(folder), name)
        return JSONResponse(status_code=status, content={"error": type(exc).__name__, "detail": detail})

    @app.get("/health", dependencies=guarded)
    def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready", dependencies=guarded)
    def ready(response: Response) -> dict[str, Any]:
        state = service.readiness()
        if not state["ready"]:
            response.status_code = 503
        return state

    @app.get("/jobs", dependencies=guarded)
    def jobs(
        state: Annotated[JobStatus | None, Query()] = None,
        study_instance_uid: Annotated[str | None, Query(pattern=_UID, max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        return [
            job.as_dict()
            for job in service.ledger.jobs(state=state, study_instance_uid=study_instance_uid, limit=limit)
        ]

    @app.get("/workers", dependencies=guarded)
    def workers() -> list[dict[str, Any]]:
        """Every node process on this ledger (coordinator, workers): role, device, heartbeat, the jobs it runs."""
        running: dict[str, list[int]] = {}
        for held in service.ledger.jobs(state=JobStatus.RUNNING, limit=1000):
            running.setdefault(held.worker, []).append(held.id)
        return [
            {**worker.as_dict(service.config.lease_s), "running": sorted(running.get(worker.id, []))}
            for worker in service.ledger.workers()
        ]

    @app.get("/jobs/{job_id}", dependencies=guarded)
    def job(job_id: Annotated[int, _JOB_ID]) -> dict[str, Any]:
        found = service.ledger.job(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found.as_dict()

    @app.post("/jobs/{job_id}/retry", dependencies=guarded)
    def retry(job_id: Annotated[int, _JOB_ID]) -> dict[str, Any]:
        found = service.ledger.retry(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found.as_dict()

    @app.get("/models", dependencies=guarded)
    def models() -> list[dict[str, Any]]:
        return [{"name": e.name, "version": e.version, "active": e.active} for e in service.registry.entries()]

    @app.get("/models/active", dependencies=guarded)
    def active_model() -> dict[str, Any]:
        model = service.model
        if model is None:
            raise HTTPException(404, "no active model")
        artifact = model.artifact
        return {
            "name": artifact.identity.name,
            "version": artifact.identity.version,
            "task": artifact.spec.name,
            "sha256": artifact.sha256,
            "provider": model.provider,
            "provenance": artifact.provenance,
        }

    @app.post("/models/{name}/{version}/activate", dependencies=guarded)
    def activate(
        name: Annotated[str, Path(pattern=_NAME)], version: Annotated[str, Path(pattern=_NAME)]
    ) -> dict[str, Any]:
        artifact = service.activate(name, version)
        service.load_active_model()
        return {"active": artifact.key}

    @app.get("/federation/alerts", dependencies=guarded)
    def federation_alerts(resolved: Annotated[bool | None, Query()] = None) -> list[dict[str, Any]]:
        """Poisoning alerts from the federated jobs this node's site took part in (and from models it was asked
        to activate): which round, which site (or its pseudonym), which screening rule; oldest first."""
        return [
            a.as_dict() for a in service.alerts.alerts() if resolved is None or resolved == (a.resolved_at is not None)
        ]

    @app.post("/federation/alerts/{alert_id}/resolve", dependencies=guarded)
    def resolve_alert(alert_id: Annotated[str, Path(pattern=_ALERT_ID)]) -> dict[str, Any]:
        """The admin has reviewed this alert: a model of its job may be activated again (as far as it goes)."""
        found = service.alerts.resolve(alert_id)
        if found is None:
            raise HTTPException(404, f"no alert {alert_id}")
        return found.as_dict()

    @app.post("/studies/{study_instance_uid}/run", dependencies=guarded)
    def run_study(study_instance_uid: Annotated[str, Path(pattern=_UID, max_length=64)]) -> dict[str, Any]:
        study_id = service.client.find_study(study_instance_uid)
        if study_id is None:
            raise HTTPException(404, "study not found in Orthanc")
        service.notify_stable_study(study_id)
        return {"orthanc_study_id": study_id, "queued_for_examination": True}

    @app.post("/orthanc/stable-study", dependencies=guarded)
    def stable_study(notice: StableStudyNotice) -> dict[str, Any]:
        service.notify_stable_study(notice.orthanc_study_id)
        return {"received": notice.orthanc_study_id}

    @app.post("/reprocess", dependencies=guarded)
    def reprocess(since: Annotated[str, Query(pattern=r"^\d{8}(T\d{6})?$")]) -> dict[str, Any]:
        """Examine again every study that became stable in Orthanc since ``since`` (Orthanc's change dates)."""
        return {"since": since, "studies": service.reprocess_since(since)}

    @app.get("/metrics", dependencies=guarded)
    def metrics() -> Response:
        service.metrics.queue_depth.set(
            service.ledger.counts().get(JobStatus.QUEUED.value, 0) + service.ledger.inbox_depth()
        )
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    def docs() -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="radfed node API")

    return app
