"""The node's model registry: verified artifacts under ``models_dir/<name>/<version>/`` and the one
the admin activated (``active.json``). A rolled-out model is stored here and served only once activated."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from radfed.inference.model.artifact import ArtifactError, ModelArtifact, load_artifact

ACTIVE_FILE = "active.json"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    version: str
    folder: Path
    active: bool


class ModelRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)

    def install(self, artifact_folder: Path) -> ModelArtifact:
        """Verify an artifact and copy it into the registry (idempotent for the same name+version+checksum)."""
        artifact = load_artifact(artifact_folder)
        target = self.folder / artifact.identity.name / artifact.identity.version
        with self._lock:
            if target.exists():
                existing = load_artifact(target)
                if existing.sha256 != artifact.sha256:
                    raise ArtifactError(f"{artifact.key} is already installed with a different model file")
                return existing
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(artifact_folder, partial)
            partial.rename(target)  # atomic: a half-copied model is never visible
        return load_artifact(target)

    def entries(self) -> list[RegistryEntry]:
        active = self.active_key()
        found = []
        for manifest in sorted(self.folder.glob("*/*/manifest.json")):
            folder = manifest.parent
            name, version = folder.parent.name, folder.name
            found.append(RegistryEntry(name, version, folder, (name, version) == active))
        return found

    def active_key(self) -> tuple[str, str] | None:
        path = self.folder / ACTIVE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return str(data["name"]), str(data["version"])

    def installed(self, name: str, version: str) -> ModelArtifact:
        folder = self.folder / name / version
        if not folder.is_dir():
            raise ArtifactError(f"model {name}:{version} is not installed")
        return load_artifact(folder)

    def activate(self, name: str, version: str) -> ModelArtifact:
        artifact = self.installed(name, version)
        temporary = self.folder / (ACTIVE_FILE + ".tmp")
        temporary.write_text(json.dumps({"name": name, "version": version}))
        temporary.replace(self.folder / ACTIVE_FILE)
        return artifact

    def active(self) -> ModelArtifact | None:
        key = self.active_key()
        return load_artifact(self.folder / key[0] / key[1]) if key else None
