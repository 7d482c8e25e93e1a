"""Fuzz a live node's HTTP API from its own OpenAPI document (schemathesis): whatever the arguments, valid
or not, no operation answers with a server error (issue 18, Done-when).

Bounded: a fixed number of examples per operation and generation mode, a timeout per request; the
OpenAPI document and ``/docs`` are routes outside the schema and are not fuzzed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.result import Err

from radfed.inference.testing.orthanc_server import OrthancProcess
from tests.plugin.node_harness import NodeProcess

EXAMPLES_PER_OPERATION = 25
REQUEST_TIMEOUT_S = 10.0
NOT_FUZZED = {"/docs", "/openapi.json"}


@dataclass(frozen=True)
class ServerError:
    operation: str
    mode: str
    status: int | str
    path: str
    query: dict[str, Any] | None
    body: Any
    answer: str

    def __str__(self) -> str:
        return (
            f"{self.operation} [{self.mode}] -> {self.status}: path={self.path} query={self.query} "
            f"body={self.body!r} answer={self.answer[:300]!r}"
        )


def _is_documented_unready(path: str, response: requests.Response) -> bool:
    """``/ready`` answers 503 with its body while the node is not ready: an answer, not a server error."""
    if path != "/ready" or response.status_code != 503:
        return False
    try:
        return response.json().get("ready") is False
    except ValueError:
        return False


def _fuzz(schema: Any, node: NodeProcess) -> tuple[list[ServerError], dict[str, int]]:
    """Every operation x {positive, negative} examples; the 5xx answers (and timeouts) found, and the
    number of requests sent per operation."""
    errors: list[ServerError] = []
    sent: dict[str, int] = {}
    session = requests.Session()
    for operation in _operations(schema):
        if operation.path in NOT_FUZZED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, node, session, errors, sent)
    return errors, sent


def _operations(schema: Any) -> list[Any]:
    """The schema's operations; one the document describes wrongly fails the test."""
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise AssertionError(f"the node's OpenAPI document is invalid: {result.err()}")
        operations.append(result.ok())
    return operations


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    node: NodeProcess,
    session: requests.Session,
    errors: list[ServerError],
    sent: dict[str, int],
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    # The token is fixed: negative examples probe the arguments, not the authentication (tested above).
    @given(case=operation.as_strategy(generation_mode=mode, headers=node.headers))
    def send(case: Any) -> None:
        sent[operation.label] = sent.get(operation.label, 0) + 1
        record = {
            "operation": operation.label,
            "mode": mode.value,
            "path": case.formatted_path,
            "query": case.query,
            "body": None if isinstance(case.body, NotSet) else case.body,
        }
        try:
            response = case.call(base_url=node.url, session=session, headers=node.headers, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            errors.append(ServerError(**record, status="timeout", answer=""))
            return
        if response.status_code >= 500 and not _is_documented_unready(operation.path, response):
            errors.append(ServerError(**record, status=response.status_code, answer=response.text))

    try:
        send()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # No argument to get wrong once the token is fixed (GET /health): nothing negative to send.


@pytest.fixture
def node(orthanc: OrthancProcess, node_factory: Callable[..., NodeProcess]) -> NodeProcess:
    node = node_factory(orthanc)
    node.start()
    return node


def test_openapi_needs_the_token(node: NodeProcess) -> None:
    assert requests.get(node.url + "/openapi.json", timeout=10).status_code == 401


def test_no_operation_answers_a_server_error(node: NodeProcess) -> None:
    schema = schemathesis.openapi.from_url(node.url + "/openapi.json", headers=node.headers, timeout=10)
    operations = {operation.label for operation in _operations(schema)}
    assert "GET /jobs" in operations and "POST /studies/{study_instance_uid}/run" in operations
    errors, sent = _fuzz(schema, node)
    assert set(sent) == operations  # every operation was exercised
    # Operations with arguments get the full budget; those without (GET /health) need one example only.
    assert max(sent.values()) == 2 * EXAMPLES_PER_OPERATION, sent
    assert not errors, f"{len(errors)} server error(s):\n" + "\n".join(map(str, errors[:20])) + "\n" + node.log_tail()
