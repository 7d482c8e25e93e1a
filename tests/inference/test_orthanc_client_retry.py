"""The Orthanc client and a connection closed without a response (what a keep-alive connection that the server
drops as it is reused looks like; real Orthanc does it only by chance under load, so a loopback server injects it):
a read goes again once on a fresh connection, a write never does."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from radfed.inference.errors import OrthancUnavailableError
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint


class DroppingServer:
    """Loopback HTTP server: the first ``drops`` connections are closed once the request is read, with no
    response; later ones answer 200 with a small JSON body. Counts the requests it saw."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.requests: list[str] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            with connection:
                request = connection.recv(65536).decode("latin-1")
                self.requests.append(request.split("\r\n", 1)[0])
                if len(self.requests) <= self.drops:
                    continue  # closed without a response
                body = json.dumps({"Version": "test"}).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                connection.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def dropping() -> Iterator[DroppingServer]:
    server = DroppingServer(drops=1)
    yield server
    server.close()


def test_a_read_dropped_once_goes_again(dropping: DroppingServer) -> None:
    with OrthancClient(OrthancEndpoint(dropping.url), timeout_s=5) as client:
        assert client.system() == {"Version": "test"}
    assert dropping.requests == ["GET /system HTTP/1.1"] * 2


def test_a_write_dropped_is_not_sent_again(dropping: DroppingServer) -> None:
    with OrthancClient(OrthancEndpoint(dropping.url), timeout_s=5) as client, pytest.raises(OrthancUnavailableError):
        client.post_json("/tools/find", {"Level": "Study", "Query": {}})
    assert dropping.requests == ["POST /tools/find HTTP/1.1"]


def test_a_read_dropped_every_time_fails_with_a_clear_error() -> None:
    server = DroppingServer(drops=10)
    try:
        client = OrthancClient(OrthancEndpoint(server.url), timeout_s=5)
        with client, pytest.raises(OrthancUnavailableError, match="does not answer"):
            client.system()
        assert len(server.requests) == 2  # once, and once again
    finally:
        server.close()
