"""Where astraora's Hydra configs are: one small module that the command line (:mod:`astraora.cli`), the
run driver (:mod:`astraora.train`), the device server and the scripts import, with no torch behind it."""

from __future__ import annotations

from pathlib import Path


def find_config_dir(package_dir: Path) -> str:
    """astraora's Hydra config folder for the package at ``package_dir``: ``<package>/conf`` where a wheel
    installed it (pyproject.toml maps the repository's ``conf/`` to ``astraora/conf``), else ``conf/``
    beside the package (a clone, an editable install). Where neither holds ``config.yaml``, the packaged
    place, which Hydra then names in its error."""
    for candidate in (package_dir / "conf", package_dir.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(package_dir / "conf")


CONFIG_DIR = find_config_dir(Path(__file__).resolve().parent)
