"""Fixtures of the node tests: ``radfed serve`` processes against real Orthanc servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from radfed.inference.testing.orthanc_server import OrthancProcess
from tests.plugin.node_harness import NodeProcess


@pytest.fixture
def node_factory(tmp_path: Path, tiny_artifact: Path) -> Iterator[Callable[..., NodeProcess]]:
    nodes: list[NodeProcess] = []

    def make(orthanc: OrthancProcess, **kwargs: object) -> NodeProcess:
        node = NodeProcess(tmp_path / f"node-{len(nodes)}", orthanc, tiny_artifact, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
