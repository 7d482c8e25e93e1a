"""The node file's schema (plugin/node/settings.py): environment overrides for every key, unknown keys refused,
the shipped templates valid, ``radfed config schema`` / ``check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radfed.plugin.commands.cli import main
from radfed.plugin.node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_any_key_can_be_set_from_the_environment() -> None:
    config = load_config(
        None,
        {
            "RADFED_API_TOKEN": "t",
            "RADFED_NODE__CONCURRENCY": "3",
            "RADFED_NODE__PREFETCH": "false",
            "RADFED_SCP__ENABLED": "true",
            "RADFED_SCP__PORT": "11112",
            "RADFED_SCP__ALLOWED_AETS": '["PACS"]',
            "RADFED_ORTHANC_PASSWORD": "1234",  # digits stay a password, not a number
            "RADFED_BENCH_JOBS": "2",  # not a node setting: left alone
        },
    )
    assert config.concurrency == 3 and config.prefetch is False
    assert config.scp is not None and config.scp.port == 11112 and config.scp.allowed_aets == {"PACS"}
    assert config.orthanc.password == "1234"


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nconcurrency = 4\nstate_dir = "/srv/a"\n')
    config = load_config(path, {"RADFED_API_TOKEN": "t", "RADFED_NODE__CONCURRENCY": "1", "RADFED_STATE_DIR": "/b"})
    assert config.concurrency == 1 and config.state_dir == Path("/b") and config.models_dir == Path("/b/models")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nconcurency = 3\n", r"node\.concurency is not a radfed node setting"),
        ("[nodes]\nconcurrency = 3\n", r"nodes is not a radfed node setting"),
        ('[node]\nconcurrency = "3"\n', r"node\.concurrency: input should be a valid integer, got '3'"),
        ("[node]\nconcurrency = 0\n", r"node\.concurrency: input should be greater than or equal to 1"),
        ('[output]\ndestination = "pacs"\n', r"output\.destination must be one of orthanc-rest, dicomweb, cstore"),
    ],
)
def test_a_wrong_key_or_value_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, {"RADFED_API_TOKEN": "t"})


@pytest.mark.parametrize("template", ["deploy/node/radfed-node.toml", "deploy/docker/radfed-node.toml"])
def test_the_shipped_templates_are_valid(template: str) -> None:
    config = load_config(ROOT / template, {"RADFED_API_TOKEN": "t"})
    assert config.api_token == "t" and config.concurrency >= 1


def test_radfed_config_prints_the_schema_and_checks_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {"orthanc", "node", "api", "output", "scp", "inference"}
    token = schema["$defs"]["ApiSection"]["properties"]["token"]["anyOf"][0]
    assert token["writeOnly"] is True  # secrets are marked as such
    path = tmp_path / "node.toml"
    path.write_text('[orthanc]\npassword = "s3cret"\n[node]\nconcurrency = 5\n')
    monkeypatch.setenv("RADFED_API_TOKEN", "t0ken")
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["node"]["concurrency"] == 5
    assert "s3cret" not in out and "t0ken" not in out
    path.write_text("[node]\nconcurrency = -1\n")
    assert main(["config", "check", str(path)]) == 1
    assert "node.concurrency" in capsys.readouterr().err
