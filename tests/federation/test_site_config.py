"""A site's SuperNode --node-config may name the node's TOML file instead of repeating its Orthanc, models
folder, state folder and device policy; both read those keys the same way (inference/node_file.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.federation.site.config import SiteConfig
from radfed.inference.model.arbiter import DevicePolicy
from radfed.plugin.node.config import ConfigError, load_config

NODE_TOML = """
[orthanc]
url = "http://radfed@10.1.2.3:8042"
password = "file-secret"

[node]
state_dir = "{state}"
device_policy = "share"

[api]
token = "t"
"""


def _node_file(tmp_path: Path, text: str = NODE_TOML) -> Path:
    path = tmp_path / "radfed-node.toml"
    path.write_text(text.format(state=tmp_path / "state"))
    return path


def test_a_site_takes_the_nodes_orthanc_folders_and_device_policy_from_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RADFED_ORTHANC_PASSWORD", raising=False)
    path = _node_file(tmp_path)
    site = SiteConfig.from_node_config({"node-toml": str(path), "site-name": "hospital-1"})
    node = load_config(path, environ={})
    assert site.data == ("http://radfed:file-secret@10.1.2.3:8042",)
    assert (node.orthanc.url, node.orthanc.username, node.orthanc.password) == (
        "http://10.1.2.3:8042",
        "radfed",
        "file-secret",
    )
    assert site.models_dir == node.models_dir == tmp_path / "state" / "models"
    assert site.node_state_dir == node.state_dir  # so the arbiter is shared: clinical jobs first
    assert site.device_policy is node.device_policy is DevicePolicy.SHARE
    assert site.state_dir == tmp_path / "state" / "site"
    assert "file-secret" not in repr(site)


def test_keys_given_in_the_node_config_override_the_file_and_the_environment_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _node_file(tmp_path)
    monkeypatch.setenv("RADFED_ORTHANC_PASSWORD", "env-secret")
    monkeypatch.setenv("RADFED_MODELS_DIR", str(tmp_path / "elsewhere"))
    site = SiteConfig.from_node_config(
        {"node-toml": str(path), "device-policy": "off", "state-dir": str(tmp_path / "site")}
    )
    assert site.data == ("http://radfed:env-secret@10.1.2.3:8042",)
    assert site.models_dir == tmp_path / "elsewhere"
    assert site.device_policy is DevicePolicy.OFF
    assert site.state_dir == tmp_path / "site"
    explicit = SiteConfig.from_node_config({"node-toml": str(path), "data": str(tmp_path / "studies")})
    assert explicit.data == (str(tmp_path / "studies"),)


def test_an_unreadable_or_wrong_node_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"node-toml.*cannot read"):
        SiteConfig.from_node_config({"node-toml": str(tmp_path / "missing.toml")})
    wrong = _node_file(tmp_path, NODE_TOML.replace('device_policy = "share"', 'device_policy = "always"'))
    with pytest.raises(ValueError, match=r"node\.device_policy must be one of"):
        SiteConfig.from_node_config({"node-toml": str(wrong)})
    with pytest.raises(ConfigError, match=r"node\.device_policy must be one of"):
        load_config(wrong, environ={})
    with pytest.raises(ValueError, match=r"'data'.*or 'node-toml' is required"):
        SiteConfig.from_node_config({"site-name": "h"})
