"""``prunecomp_manifest.json``: what an output is (source, recipe, removed layers, checks, targets)
and the sha256 of every other file in it, which ``prunecomp-export verify`` checks.

One typed schema, ``Manifest``, is what the run writes and what every stage command reads. A manifest
is untrusted input (an output may have been copied from anywhere): ``read_manifest`` reads at most
``MAX_MANIFEST_BYTES`` of a regular file (never through a symbolic link), refuses JSON nested deeper
than ``MAX_JSON_DEPTH`` or with a key given twice, and reports the first problem as one
``OutputFileError`` naming the file and the key path (``removed.0.alpha: expected a number``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

from prunecomp_export.errors import OutputFileError, PrunecompError, shown
from prunecomp_export.output.outputdir import MANIFEST
from prunecomp_export.recipe import Recipe, RecipeOrigin, check_device_syntax
from prunecomp_export.validation import FiniteFloat, first_error

MANIFEST_SCHEMA = "prunecomp-manifest/2"
#: a manifest of a 70B output (a few hundred shards, every target's record) is well under 1 MB
MAX_MANIFEST_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
#: the reload check's sample and expected logits, kept at the top of the output
VERIFICATION_FILE = "verification.safetensors"


def _relative_path(text: str) -> str:
    """A path inside the output: relative, POSIX, without ``..``, empty or control characters."""
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or any(part in ("..", ".") for part in parts) or not text.isprintable():
        raise ValueError(f"{shown(repr(text))} is not a path inside the output")
    return text


def _sha256_hex(text: str) -> str:
    if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
        raise ValueError(f"{shown(repr(text[:70]))} is not a sha256 (64 lower-case hex digits)")
    return text


RelativePath = Annotated[str, AfterValidator(_relative_path)]
Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class _Record(BaseModel):
    """Unknown keys are errors; values keep their JSON types; a record never changes once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SourceModel(_Record):
    """What the model was made from (``source.loading.source_identity``)."""

    source: str = Field(description="How the source was given: dir:<path>, gguf:<file> or hub:<id>@<revision>.")
    location: str = Field(description="Its directory or hub id.")
    sha256: Sha256 | None = Field(description="Over its weight files (null: a hub source not downloaded).")
    hashed_files: list[str] = Field(description="The files the sha256 covers, by name.")


class CompensationCheck(_Record):
    """The removal's calibration loss on the batches held back from the compensation's fit, with the
    compensation as measured, with none, and with half of it (null from an older run, whose check tried
    half only when the full one raised the loss); ``kept`` is what was folded: the lowest of them
    (``engine.loop.CompensationCheck``)."""

    kept: Literal["full", "half", "none"]
    loss_full: FiniteFloat
    loss_none: FiniteFloat
    loss_half: FiniteFloat | None = None


class Removal(_Record):
    """One removal of the pruning loop (``engine.loop.Step.to_json``)."""

    removed: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="Original layer indices.")
    alpha: FiniteFloat = Field(gt=0, description="The scalar folded for them.")
    paper_alpha: FiniteFloat | None = Field(gt=0, description="The paper's magnitude gap, beside a fitted scalar.")
    output_map_layer: int | None = Field(ge=0, description="The layer whose MLP carries a linear map.")
    check: CompensationCheck | None = Field(
        None,
        description="The held-back check that kept, halved or dropped the compensation (null: none to check, "
        "prune.judge_batches 0, or an output written before the check existed).",
    )


class ReloadCheck(_Record):
    """How the reload check ran: recorded beside its result, so that ``prunecomp-export verify``
    repeats exactly that check on the output later."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(description="The dtype the checkpoint is reloaded in.")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(description="transformers' attention kernel.")
    device: str = Field(description="Where it ran: cpu, cuda or cuda:N.")
    sample_file: RelativePath = Field(VERIFICATION_FILE, description="The sample and expected logits, in the output.")
    max_memory: dict[str, NonNegativeInt] | None = Field(
        None,
        description="The memory plan's placement of the reloaded model (accelerate's max_memory per device: "
        "a GPU's index or cpu); null: the whole model on the device.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_syntax(value)

    @field_validator("max_memory")
    @classmethod
    def _memory_devices(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None and any(key != "cpu" and not key.isdigit() for key in value):
            raise ValueError("keys must be cpu or a GPU's index")
        return value

    def run(self, output: Path, device: str | None = None, scratch: Path | None = None) -> dict:
        """``verify_reload`` of ``output/checkpoint`` against ``output/<sample_file>`` in a fresh process
        (its peak memory is the reloaded model's, not the CLI's); the check's record. What the plan
        offloads goes into a directory under ``scratch`` (default: the temp directory), removed after."""
        import tempfile

        from prunecomp_export.child import ChildRequest, run_child

        device = device or self.device
        placed = self.max_memory if device == self.device else None  # another device: its own placement
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="offload-", dir=scratch) as offload:
            request = ChildRequest(
                name="reload check",
                target="prunecomp_export.output.checkpoint:verify_from_file",
                kwargs={"directory": str(output / "checkpoint"), "tensors": str(output / self.sample_file),
                        "dtype": self.dtype, "attn_implementation": self.attn_implementation, "device": device,
                        "max_memory": None if placed is None else dict(placed), "offload_folder": offload},
            )  # fmt: skip
            return run_child(request).value


class ReloadResult(_Record):
    """The reload check's result (``output.checkpoint.verify_reload``) and how it ran."""

    reloaded_layers: int = Field(ge=1)
    max_abs_logit_diff: FiniteFloat
    cached_decode_max_abs_logit_diff: FiniteFloat
    generate_cache_equals_no_cache: bool
    generated_tokens: list[int]
    tolerance: FiniteFloat
    placement: dict[str, NonNegativeInt] | None = Field(
        None, description="How many modules the reload put on each device or on disk; null in older outputs."
    )
    check: ReloadCheck | None = Field(None, description="null in outputs of a prunecomp-export before verify.")


class Manifest(_Record):
    """``prunecomp_manifest.json``, field by field (in the order it is written)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_by_alias=True, validate_by_name=True,
                              serialize_by_alias=True)  # fmt: skip

    # "schema" in the file; ``schema_id`` here (``schema`` is a BaseModel attribute)
    schema_id: Literal["prunecomp-manifest/2"] = Field(MANIFEST_SCHEMA, alias="schema")
    source_model: SourceModel
    recipe: Recipe = Field(description="The resolved recipe (output.dir is '.': the output itself).")
    model_type: str
    layers_before: int = Field(ge=1)
    layers_after: int = Field(ge=1)
    removed: list[Removal]
    compensation: Literal["magnitude", "fitted", "linear", "none"]
    fold_form: Literal["pre_gap", "post_gap"] | None
    untied_embeddings: bool
    verification: ReloadResult | None = Field(description="null when the run made no reload check.")
    targets: dict[str, dict[str, Any]] = Field(description="Each built target's record, by target name.")
    packages: dict[str, str | None]
    machine: dict[str, Any]
    files: dict[RelativePath, Sha256] = Field(description="sha256 of every other file of the output (written last).")

    @field_validator("targets")
    @classmethod
    def _target_records(cls, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Each record as its target reads it (its parity figures), so no later reader meets a bad one."""
        from prunecomp_export.registry import UnknownName
        from prunecomp_export.report.results import deployed_targets
        from prunecomp_export.validation import nested_error

        for name, record in records.items():
            try:
                deployed_targets({name: record})
            except UnknownName as exc:
                raise nested_error(f"targets.{name}", str(exc)) from None
            except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValidationError) else "a bad figure"
                raise nested_error(f"targets.{name}", f"not a build record of the {name} target ({detail})") from None
        return records

    @model_validator(mode="after")
    def _layers_add_up(self) -> Manifest:
        removed = sum(len(step.removed) for step in self.removed)
        if self.layers_after >= self.layers_before or removed != self.layers_before - self.layers_after:
            raise ValueError(
                f"layers_before ({self.layers_before}), layers_after ({self.layers_after}) and the "
                f"{removed} removed layers do not add up"
            )
        return self

    @property
    def layers_removed(self) -> int:
        return self.layers_before - self.layers_after


# --- files of an output ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputFiles:
    """What an output holds, found without following a symbolic link: each regular file (with its
    sha256 when hashed, else None), and every other entry (a link, a FIFO, a socket) with what it is."""

    digests: dict[str, str | None] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)


def output_files(directory: Path, *, hashed: bool = True) -> OutputFiles:
    """Every file below ``directory`` but the manifest, keyed by relative POSIX path. A symbolic link
    is never followed, and a file is opened only once it is known to be a regular one (a FIFO would
    block a reader forever)."""
    found = OutputFiles()
    for root, dirs, files in os.walk(directory, followlinks=False):
        base = Path(root)
        for name in sorted([*dirs, *files]):
            path = base / name
            relative = path.relative_to(directory).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found.others[relative] = "a symbolic link (not followed)"
            elif stat.S_ISREG(mode):
                if relative == MANIFEST:
                    continue
                digest = _sha256_regular(path) if hashed else ""
                if digest is None:
                    found.others[relative] = "replaced while it was read"
                else:
                    found.digests[relative] = digest or None
            elif not stat.S_ISDIR(mode):
                found.others[relative] = "not a regular file"
        dirs[:] = [name for name in dirs if not os.path.islink(base / name)]
    return found


def _sha256_regular(path: Path) -> str | None:
    """sha256 of a regular file, opened without following a link; None if it is no longer one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as handle:
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listed_files(directory: Path) -> dict[str, str]:
    """sha256 of every file of an output but the manifest itself, keyed by relative path; an output
    this tool writes holds nothing but regular files and directories."""
    found = output_files(directory)
    if found.others:
        name, what = next(iter(found.others.items()))
        raise PrunecompError(f"{shown(directory / name)}: {what}: an output holds regular files only")
    return {name: digest for name, digest in found.digests.items() if digest is not None}


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """The manifest, with its file list taken from ``directory`` as it is now (write it last)."""
    written = manifest.model_copy(update={"files": listed_files(directory)})
    (directory / MANIFEST).write_text(written.model_dump_json(indent=2) + "\n")
    return written


# --- reading --------------------------------------------------------------------------------------


def read_small_file(path: Path, limit: int, error: Callable[[str], Exception]) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, opened without following a symbolic
    link; anything else raises ``error(message)``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error("missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error("a symbolic link: not followed") from None
        raise error(f"cannot read it: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error("a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise error(f"cannot read it: {exc.strerror}") from None
    if len(data) > limit:
        raise error(f"larger than {limit >> 20} MiB")
    return data


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"the key {shown(repr(key[:60]))} is given twice in one object")
        mapping[key] = value
    return mapping


def _too_deep(value: Any, limit: int) -> str | None:
    """The key path of the first object or array nested more than ``limit`` deep, else None (no recursion)."""
    pending: list[tuple[Any, list[str]]] = [(value, [])]
    while pending:
        node, path = pending.pop()
        if isinstance(node, dict | list) and len(path) >= limit:
            return ".".join(path)
        if isinstance(node, dict):
            pending.extend((child, [*path, str(key)]) for key, child in node.items())
        elif isinstance(node, list):
            pending.extend((child, [*path, str(index)]) for index, child in enumerate(node))
    return None


def parse_manifest(data: bytes, file: str) -> Manifest:
    """A manifest from its bytes; the first problem as one ``OutputFileError`` naming ``file`` and the key."""
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_key_twice)
    except RecursionError:
        raise OutputFileError(f"not a manifest: JSON nested deeper than {MAX_JSON_DEPTH} levels", file=file) from None
    except UnicodeDecodeError:
        raise OutputFileError("not a manifest: not UTF-8 text", file=file) from None
    except ValueError as exc:
        raise OutputFileError(f"not valid JSON: {' '.join(str(exc).split())}", file=file) from None
    if (where := _too_deep(raw, MAX_JSON_DEPTH)) is not None:
        raise OutputFileError(f"nested deeper than {MAX_JSON_DEPTH} levels", key=where, file=file)
    if not isinstance(raw, dict):
        raise OutputFileError("not a manifest: a JSON object is expected", file=file)
    if raw.get("schema") != MANIFEST_SCHEMA:
        schema = raw.get("schema")
        got = f"schema {shown(repr(schema))[:80]}" if schema is not None else "no schema"
        raise OutputFileError(f"not a {MANIFEST_SCHEMA} manifest ({got})", key="schema", file=file)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        key, message = first_error(exc, Manifest)
        raise OutputFileError(message, key=key or None, file=file) from None
    except RecursionError:
        raise OutputFileError(f"nested deeper than {MAX_JSON_DEPTH} levels", file=file) from None
    # a problem found later with a recorded recipe value names the manifest and the key in it
    manifest.recipe.with_origin(RecipeOrigin(file=file, key_prefix="recipe"))
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """The manifest of the output ``directory``, read as untrusted input."""
    path = Path(directory) / MANIFEST
    file = str(path)

    def unreadable(problem: str) -> OutputFileError:
        return OutputFileError(problem, file=file)

    return parse_manifest(read_small_file(path, MAX_MANIFEST_BYTES, unreadable), file)
