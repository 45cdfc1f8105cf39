"""Pydantic's validation errors in the words the CLI prints, for every reader of untrusted text (the
recipe, the manifest): one key path and one plain message, never pydantic's own phrasing ("a valid
dictionary or instance of PruneSpec", "unable to parse string as an integer").

Also what those readers share: ``FiniteFloat`` (every float of a recipe or manifest; ``inf`` and
``nan`` are refused), ``either`` (a union reported as one message, not one per member) and
``check_host`` (a server's bind address, from a recipe or ``--host``).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AllowInfNan, BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from prunecomp_export.errors import shown

#: every float a recipe or a manifest holds: ``inf``, ``-inf`` and ``nan`` (``.inf`` in YAML) are refused
FiniteFloat = Annotated[float, AllowInfNan(False)]


def either(expected: str) -> WrapValidator:
    """A union's validation failure as one error at the field itself, ``expected <expected>`` (pydantic
    reports one error per member, each under a key path holding the member's type); a bad item of a
    list member is named by its index."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            inner = next((err for err in exc.errors() if len(err["loc"]) > 1), None)
            if inner is not None:
                message = f"item {inner['loc'][1]}: {plain_message(inner)}"
            else:
                message = f"expected {expected}, not {_kind(value)}"
            raise PydanticCustomError("either", "{message}", {"message": message}) from None

    return WrapValidator(validate)


def shown_value(value: Any) -> str:
    """A value as the message names it: short, and saying what kind of thing it is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return repr(text)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{shown_value(value)} (a boolean)"
    if isinstance(value, dict | list | tuple):
        return shown_value(value)
    if isinstance(value, str):
        return f"the text {shown_value(value)}"
    return shown_value(value)


def _plural(count: Any, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


#: pydantic error type -> the message, from its ``ctx`` and ``got`` (the input as the message names it)
_MESSAGES: dict[str, Callable[[dict[str, Any], str], str]] = {
    "int_type": lambda ctx, got: f"expected a whole number, not {got}",
    "int_parsing": lambda ctx, got: f"expected a whole number, not {got}",
    "int_from_float": lambda ctx, got: f"expected a whole number, not {got}",
    "int_parsing_size": lambda ctx, got: "the number is too large",
    "float_type": lambda ctx, got: f"expected a number, not {got}",
    "float_parsing": lambda ctx, got: f"expected a number, not {got}",
    "finite_number": lambda ctx, got: f"expected a finite number, not {got}",
    "bool_type": lambda ctx, got: f"expected true or false, not {got}",
    "bool_parsing": lambda ctx, got: f"expected true or false, not {got}",
    "string_type": lambda ctx, got: f"expected text, not {got}",
    "list_type": lambda ctx, got: f"expected a list, not {got}",
    "dict_type": lambda ctx, got: f"expected a mapping of keys to values, not {got}",
    "model_type": lambda ctx, got: f"expected a section (a mapping of keys to values), not {got}",
    "model_attributes_type": lambda ctx, got: f"expected a section (a mapping of keys to values), not {got}",
    "literal_error": lambda ctx, got: f"expected {ctx.get('expected')}, not {got}",
    "greater_than": lambda ctx, got: f"must be greater than {ctx.get('gt')}",
    "greater_than_equal": lambda ctx, got: f"must be at least {ctx.get('ge')}",
    "less_than": lambda ctx, got: f"must be less than {ctx.get('lt')}",
    "less_than_equal": lambda ctx, got: f"must be at most {ctx.get('le')}",
    "too_short": lambda ctx, got: f"must hold at least {_plural(ctx.get('min_length'), 'item')}",
    "too_long": lambda ctx, got: f"must hold at most {_plural(ctx.get('max_length'), 'item')}",
    "string_too_short": lambda ctx, got: f"must be at least {_plural(ctx.get('min_length'), 'character')} long",
    "string_too_long": lambda ctx, got: f"must be at most {_plural(ctx.get('max_length'), 'character')} long",
    "string_pattern_mismatch": lambda ctx, got: f"{got} is not in the expected form",
    "none_required": lambda ctx, got: f"expected null, not {got}",
    "missing": lambda ctx, got: "required key is missing",
    "recursion_loop": lambda ctx, got: "nested too deeply",
}


def plain_message(err: Any) -> str:
    """The message of one pydantic error in plain words (without its key path)."""
    plain = _MESSAGES.get(err["type"])
    if plain is not None:
        return plain(err.get("ctx") or {}, _kind(err.get("input")))
    return " ".join(str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ").split())


def describe(err: Any, root: type[BaseModel]) -> tuple[str, str]:
    """(key path, message) of one pydantic error of a ``root`` model, in the words the CLI prints."""
    if err["type"] == "nested_error":  # its key starts at the field that raised it
        return ".".join([*map(str, err["loc"][:-1]), err["ctx"]["key"]]), err["ctx"]["message"]
    loc = err["loc"]
    if "[key]" in loc:  # a bad mapping key: the mapping is where it is, the message names the key
        loc = loc[: loc.index("[key]") - 1]
    key = ".".join(str(part) for part in loc if not str(part).startswith("function-"))
    if err["type"] == "extra_forbidden":
        return key, "unknown key" + did_you_mean(err["loc"], root)
    return key, plain_message(err)


def first_error(exc: ValidationError, root: type[BaseModel]) -> tuple[str, str]:
    """The error to report of several: an unknown key before a missing one, since a misspelt key
    (``pruning:``) is what leaves the right one (``prune``) missing."""
    errors = exc.errors()
    chosen = next((err for err in errors if err["type"] == "extra_forbidden"), errors[0])
    return describe(chosen, root)


def nested_error(key: str, message: str) -> PydanticCustomError:
    """An error a field validator found inside its value (a target's options), at ``key``: the key path
    from that field on (``targets.vllm.port``)."""
    return PydanticCustomError("nested_error", "{message}", {"key": key, "message": message})


def did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """`` (did you mean 'x'?)`` for an unknown key close to a known one, else the allowed keys."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        if field is None and isinstance(part, int):
            continue  # an index into a list of models
        model = _model_in(getattr(field, "annotation", None))
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(text: str) -> str:
    """An address to bind a server to: an IPv4 or IPv6 address, or a host name (RFC 1123 labels, at
    most 253 characters). Raises ``ValueError`` with the user's message."""
    try:
        return str(ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text))
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    # all digits (999.1.1.1) is a bad address, not a name
    if 0 < len(name) <= 253 and all(map(_HOST_LABEL.fullmatch, labels)) and not name.replace(".", "").isdigit():
        return text
    raise ValueError(f"{shown(repr(text))} is not an IP address or a host name")
