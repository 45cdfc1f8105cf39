"""Resolve a recipe's model source and load it (config only for --dry-run, or weights too)."""

from __future__ import annotations

import hashlib
import importlib.util
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


def resolve_source(spec: ModelSpec) -> ResolvedSource:
    """Turn ``model.source`` into a loadable location, failing early on missing local files."""
    source = spec.source
    if source.startswith("package:"):
        package, _, relative = source.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(package) if package else None
        if found is None or not found.submodule_search_locations:
            raise RecipeError(f"Python package {package!r} is not installed (from {source!r})", key="model.source")
        path = Path(next(iter(found.submodule_search_locations))) / relative
        if not path.exists():
            raise RecipeError(f"file not found: {path}", key="model.source")
        return _local(path, spec)
    path = Path(source).expanduser()
    if path.exists():
        return _local(path, spec)
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise RecipeError(f"file not found: {source}", key="model.source")
    return ResolvedSource(source, spec.gguf_file, local=False, description=f"hub:{source}@{spec.revision or 'main'}")


def _local(path: Path, spec: ModelSpec) -> ResolvedSource:
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
    if not weights:
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


def load_model(source: ResolvedSource, spec: ModelSpec):
    """Load the causal LM in eval mode with safetensors only, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = source.load_kwargs(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source.location,
            dtype=getattr(torch, spec.dtype),
            attn_implementation=spec.attn_implementation,
            use_safetensors=None if source.gguf_file else True,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the model from {source.description}: {_first_line(exc)}") from None
    model.eval()
    if source.gguf_file:
        # GGUF weights are dequantized to plain tensors on load, but transformers keeps the GGUF
        # "quantizer" and its config note, which would make the model refuse save_pretrained and
        # the saved config claim a quantization it no longer has.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


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
