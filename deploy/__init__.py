"""radfed.deploy: what a hospital installs beside the code, shipped inside the wheel as package data.

``orthanc/`` (the Orthanc Python plugin script and the configuration keys to add), ``node/`` (the node's
TOML template), ``flower/`` (the Flower app of a federated job), ``ohif/`` (the viewer configuration and the
script that fetches OHIF) and ``systemd/`` (unit files). In a checkout this is the top-level ``deploy/``
folder; ``python -m radfed.deploy`` prints where the installed copies are.

Nothing here is imported by Orthanc or Flower: they are given the paths that :func:`asset` returns.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["ASSETS", "asset"]

# name -> path inside this package, for `python -m radfed.deploy` and the docs
ASSETS: dict[str, tuple[str, ...]] = {
    "orthanc-plugin": ("orthanc", "radfed_orthanc_plugin.py"),
    "orthanc-config": ("orthanc", "orthanc-radfed.json"),
    "orthanc-explorer-2": ("orthanc", "orthanc-explorer-2-radfed.json"),
    "node-config": ("node", "radfed-node.toml"),
    "flower-app": ("flower",),
    "ohif-config": ("ohif", "app-config.js"),
    "ohif-fetch": ("ohif", "fetch-ohif.sh"),
    "systemd": ("systemd",),
}


def asset(*parts: str) -> Path:
    """The file-system path of a shipped deployment file or folder.

    Parameters
    ----------
    *parts
        Path components below ``radfed.deploy``, e.g. ``asset("flower")`` or
        ``asset("orthanc", "radfed_orthanc_plugin.py")``.

    Returns
    -------
    pathlib.Path
        An existing path. Orthanc, Flower and bash need a real file, so an install that is not on the
        file system (a zip import) is refused rather than extracted to a temporary copy.

    Raises
    ------
    FileNotFoundError
        The asset is not part of this installation.
    """
    root = resources.files(__name__)
    if not isinstance(root, Path):
        raise FileNotFoundError(f"radfed.deploy is not installed on the file system ({root!r})")
    path = root.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"radfed.deploy has no {'/'.join(parts)} (looked in {root})")
    return path
