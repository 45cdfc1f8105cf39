"""Property-based tests of the two readers of untrusted text: any YAML document gives a Recipe or
exactly one RecipeError, any manifest gives a Manifest or exactly one OutputFileError; never another
exception, never a hang (each example has a deadline). Bounded, so CI runs them in well under a minute."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunecomp_export.errors import OutputFileError, RecipeError
from prunecomp_export.output.manifest import Manifest, parse_manifest
from prunecomp_export.recipe import Recipe, load_recipe

SETTINGS = settings(
    max_examples=200,
    deadline=timedelta(seconds=5),
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: keys a recipe or manifest has, so generated documents reach the validators, not only "unknown key"
KEYS = [
    *Recipe.model_fields, *Manifest.model_fields, "schema", "source", "num_drop", "ratio", "drop_layers", "metric",
    "trajectory", "points", "memory_budget", "max_shard_size", "seq_len", "device", "alpha", "removed", "vllm",
    "onnx", "port", "host", "check", "sample_file", "dtype", "tasks", "qa", "perplexity", "corpora", "<<",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["all", "inf", "-.inf", ".nan", "5GB", "true", "cuda:99", "../x", "a" * 64, "0" * 64]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)

RECIPE = {"model": {"source": "m"}, "prune": {"num_drop": 1}}


def a_recipe_with(path: list[str], value: object) -> dict:
    """The minimal recipe with ``value`` set at ``path`` (sections created as needed)."""
    recipe = copy.deepcopy(RECIPE)
    node = recipe
    for part in path[:-1]:
        child = node.get(part)
        node[part] = child if isinstance(child, dict) else {}
        node = node[part]
    node[path[-1]] = value
    return recipe


def reads_as_recipe_or_one_error(path: Path, text: str, overrides: list[str] | None = None) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except RecipeError as exc:
        assert str(exc).strip() and "\n" not in str(exc)  # one line


@SETTINGS
@given(text=st.text(max_size=400))
def test_any_text_is_a_recipe_or_one_error(tmp_path, text):
    reads_as_recipe_or_one_error(tmp_path / "recipe.yaml", text)


@SETTINGS
@given(document=values, flow=st.booleans())
def test_any_yaml_document_is_a_recipe_or_one_error(tmp_path, document, flow):
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    reads_as_recipe_or_one_error(tmp_path / "recipe.yaml", text)


@SETTINGS
@given(path=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4), value=values)
def test_a_recipe_with_any_value_anywhere_is_a_recipe_or_one_error(tmp_path, path, value):
    reads_as_recipe_or_one_error(tmp_path / "recipe.yaml", yaml.safe_dump(a_recipe_with(path, value)))


@SETTINGS
@given(key=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join), value=st.text(max_size=40))
def test_any_set_override_is_a_recipe_or_one_error(tmp_path, key, value):
    reads_as_recipe_or_one_error(tmp_path / "recipe.yaml", yaml.safe_dump(RECIPE), [f"{key}={value}"])


# --- manifests ----------------------------------------------------------------------------------

VALID_MANIFEST = {
    "schema": "prunecomp-manifest/2",
    "source_model": {"source": "dir:m", "location": "m", "sha256": "0" * 64, "hashed_files": ["model.safetensors"]},
    "recipe": Recipe.model_validate(RECIPE).model_dump(mode="json"),
    "model_type": "llama",
    "layers_before": 6,
    "layers_after": 5,
    "removed": [{"removed": [3], "alpha": 1.05, "paper_alpha": None, "output_map_layer": None}],
    "compensation": "magnitude",
    "fold_form": "pre_gap",
    "untied_embeddings": False,
    "verification": {
        "reloaded_layers": 5,
        "max_abs_logit_diff": 0.0,
        "cached_decode_max_abs_logit_diff": 0.0,
        "generate_cache_equals_no_cache": True,
        "generated_tokens": [1, 2],
        "tolerance": 1e-4,
        "check": {
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "device": "cpu",
            "sample_file": "verification.safetensors",
        },
    },
    "targets": {},
    "packages": {"torch": "2.13.0"},
    "machine": {"python": "3.11"},
    "files": {"checkpoint/config.json": "1" * 64},
}


def test_the_valid_manifest_is_valid():
    assert parse_manifest(json.dumps(VALID_MANIFEST).encode(), "m.json").layers_removed == 1


def reads_as_manifest_or_one_error(data: bytes) -> None:
    try:
        assert isinstance(parse_manifest(data, "OUT/prunecomp_manifest.json"), Manifest)
    except OutputFileError as exc:
        assert str(exc).startswith("OUT/prunecomp_manifest.json") and "\n" not in str(exc)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_are_a_manifest_or_one_error(data):
    reads_as_manifest_or_one_error(data)


@SETTINGS
@given(document=values)
def test_any_json_document_is_a_manifest_or_one_error(document):
    reads_as_manifest_or_one_error(json.dumps(document).encode())


def paths_of(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_of(child, (*prefix, index))
    return found


MANIFEST_PATHS = paths_of(VALID_MANIFEST)[1:]


@SETTINGS
@given(path=st.sampled_from(MANIFEST_PATHS), value=values, remove=st.booleans())
def test_a_manifest_with_any_value_anywhere_is_a_manifest_or_one_error(path, value, remove):
    manifest = copy.deepcopy(VALID_MANIFEST)
    node = manifest
    for part in path[:-1]:
        node = node[part]
    if remove and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    reads_as_manifest_or_one_error(json.dumps(manifest).encode())


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deep_json_is_one_error_not_a_recursion(depth):
    with pytest.raises(OutputFileError, match="nested deeper than 64 levels"):
        parse_manifest(("[" * depth + "]" * depth).encode(), "m.json")
