"""``prunecomp_manifest.json``: what an output is (source, recipe, removed layers, checks, targets)
and the sha256 of every other file in it, which ``prunecomp-export verify`` checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunecomp_export.output.checkpoint import sha256_tree
from prunecomp_export.output.outputdir import MANIFEST

MANIFEST_SCHEMA = "prunecomp-manifest/2"


def listed_files(directory: Path) -> dict[str, str]:
    """sha256 of every file of an output but the manifest itself, keyed by relative path."""
    return {name: digest for name, digest in sha256_tree(directory).items() if name != MANIFEST}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The manifest, with its file list taken from ``directory`` as it is now (write it last)."""
    manifest = {"schema": MANIFEST_SCHEMA, **manifest, "files": listed_files(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
