"""The README's reference, generated: every recipe key and target option with its default, allowed
values and description (from the pydantic models, the single source), the exit codes and the
environment variables (from the CLI, which ``--help`` shows too).

``python -m prunecomp_export.reference`` rewrites the marked blocks of README.md; ``--check`` exits 1
when they differ from what the models generate (a test runs it), so the reference cannot drift.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import AllowInfNan, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = ("usage", "recipe")


def _escape(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _bounds(metadata: list[Any], unit: str = "") -> str:
    parts = []
    for item in metadata:
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{symbol} {value:g}" if isinstance(value, float) else f"{symbol} {value}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append("not empty" if item.min_length == 1 else f"at least {item.min_length} {unit}")
    return ", ".join(parts)


def _type(annotation: Any, metadata: list[Any] = ()) -> str:
    """The allowed values of a field, in the README's words."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *extra = args
        return _type(base, [*metadata, *(m for m in extra if not isinstance(m, AllowInfNan))])
    if annotation == (int | str):  # recipe.Size, the only such union
        return "size: bytes, or a number and a unit (500MB, 5GB, 2GiB)"
    bounds = _bounds(list(metadata), "items" if origin is list else "characters")
    if origin is typing.Literal:
        return " | ".join(f"`{json.dumps(value)}`" for value in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        members = [arg for arg in args if arg is not type(None)]
        shown = " or ".join(_type(arg, metadata if len(members) == 1 else []) for arg in members)
        return f"{shown} or `null`" if type(None) in args else shown
    if origin is list:
        inner = _type(args[0])
        inner = {"integer": "integers", "number": "numbers", "section (keys below)": "sections (keys below)"}.get(
            inner, inner
        )
        return f"list of {inner}" + (f" ({bounds})" if bounds else "")
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section (keys below)"
    name = {int: "integer", float: "number", bool: "`true` | `false`", str: "text"}.get(annotation, str(annotation))
    return f"{name} ({bounds})" if bounds else name


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(keys below)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return ", ".join(str(getattr(item, "name", "")) for item in value)
    return f"`{json.dumps(value)}`"


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The model whose keys a field holds (a section, an optional section, a list of sections)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One table row per key of ``model``, nested sections' keys after their section."""
    lines = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        lines.append(
            f"| `{key}` | {_default(info)} | {_escape(_type(info.annotation, info.metadata))} "
            f"| {_escape(info.description or '')} |"
        )
        nested = _nested(info.annotation)
        if nested is not None:
            inner = f"{key}[]." if typing.get_origin(info.annotation) is list else f"{key}."
            lines += rows(nested, inner)
    return lines


HEADER = ["| key | default | allowed | what it does |", "|---|---|---|---|"]


def recipe_block() -> str:
    from prunecomp_export.recipe import Recipe
    from prunecomp_export.targets import TARGETS, load_target

    parts = []
    for name, info in Recipe.model_fields.items():
        section = _nested(info.annotation)
        if section is None:
            continue
        parts += [f"**`{name}`**: {_escape(info.description or '')}", "", *HEADER, *rows(section, f"{name}."), ""]
    parts += [
        "**`targets`**: each target's options, under `targets.<name>` (checked whether the target is requested or"
        " not; `--set targets.vllm.port=8000`).",
        "",
    ]
    for name in TARGETS.names():
        options = load_target(name).Options
        if not options.model_fields:
            parts += [f"`targets.{name}`: no options.", ""]
            continue
        parts += [f"`targets.{name}`:", "", *HEADER, *rows(options, f"targets.{name}."), ""]
    return "\n".join(parts).rstrip() + "\n"


def usage_block() -> str:
    from prunecomp_export.cli import ENVIRONMENT, EXIT_CODES

    lines = ["| exit code | meaning |", "|---|---|"]
    lines += [f"| {code} | {_escape(meaning)} |" for code, meaning in EXIT_CODES.items()]
    lines += ["", "| environment variable | what it does |", "|---|---|"]
    lines += [f"| `{name}` | {_escape(meaning)} |" for name, meaning in ENVIRONMENT.items()]
    return "\n".join(lines) + "\n"


GENERATORS = {"usage": usage_block, "recipe": recipe_block}


def _marks(block: str) -> tuple[str, str]:
    return (
        f"<!-- reference:{block} (generated by python -m prunecomp_export.reference; edit the models) -->\n",
        f"<!-- /reference:{block} -->",
    )


def updated(text: str) -> str:
    """``text`` (the README) with every marked block replaced by what the models generate."""
    for block, generate in GENERATORS.items():
        start, end = _marks(block)
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"README.md has no {start.strip()} ... {end} block")
        text = pattern.sub(lambda _match, g=generate, s=start, e=end: f"{s}\n{g()}\n{e}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's reference blocks; ``--check``: exit 1 when they are stale, writing nothing."""
    args = sys.argv[1:] if argv is None else argv
    text = README.read_text()
    new = updated(text)
    if "--check" in args:
        if new != text:
            print(f"{README}: the reference is stale: run python -m prunecomp_export.reference", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
