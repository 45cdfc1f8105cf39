"""Text sources: the builtin offline corpora, text files, and ``datasets`` datasets.

The builtin corpora come from real English text that installs with the ``gensim`` wheel, so the
demo and the tests need no network. The Wikipedia excerpt is split by article: the first half of
the articles is for calibration, the second half is held out for evaluation and never calibrated on.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from prunecomp_export.errors import RecipeError
from prunecomp_export.registry import Registry, UnknownName

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
MIN_ARTICLE_CHARS = 500

BUILTIN: Registry[Callable[[], list[str]]] = Registry("builtin corpus")


def gensim_data_dir() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the builtin corpora need the 'gensim' package: pip install gensim")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


@cache
def wikipedia_articles() -> tuple[str, ...]:
    """Plain text of the Wikipedia excerpt's real articles (redirects and stubs dropped), in file order.

    Stripping the wiki markup takes tens of seconds, so the result is cached on disk, keyed by the
    source file's size and modification time."""
    source = gensim_data_dir() / WIKI_FILE
    stat = source.stat()
    cached = _cache_dir() / f"gensim-wiki-{stat.st_size}-{int(stat.st_mtime)}-{MIN_ARTICLE_CHARS}.json"
    if cached.is_file():
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(source) as handle:
        for _title, markup, _page_id in extract_pages(handle):
            text = re.sub(r"\n{3,}", "\n\n", filter_wiki(markup)).strip()
            if len(text) >= MIN_ARTICLE_CHARS and not text.lower().startswith("#redirect"):
                articles.append(text)
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_suffix(f".tmp-{os.getpid()}")
    staging.write_text(json.dumps(articles), encoding="utf-8")
    os.replace(staging, cached)
    return tuple(articles)


def _cache_dir() -> Path:
    return Path(os.environ.get("PRUNECOMP_CACHE", Path.home() / ".cache" / "prunecomp_export"))


@BUILTIN.register("gensim-wiki")
def wiki_calibration_part() -> list[str]:
    """First half of the Wikipedia articles: the calibration part."""
    articles = wikipedia_articles()
    return list(articles[: len(articles) // 2])


@BUILTIN.register("gensim-wiki-heldout")
def wiki_heldout_part() -> list[str]:
    """Second half of the Wikipedia articles: never used for calibration."""
    articles = wikipedia_articles()
    return list(articles[len(articles) // 2 :])


@BUILTIN.register("gensim-news")
def news_articles() -> list[str]:
    """The Lee news corpus (Australian news articles, one per line)."""
    lines = (gensim_data_dir() / NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


#: Evaluation corpora of the paper, through ``datasets`` (they need network or a warm HF cache):
#: name -> (dataset, config, split, text field, data_files).
ONLINE: dict[str, tuple[str, str | None, str, str, str | None]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text", None),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence", None),
    "c4": ("allenai/c4", None, "validation", "text", "en/c4-validation.00000-of-00008.json.gz"),
}


def builtin_corpus(name: str, *, key: str) -> list[str]:
    try:
        return BUILTIN.get(name)()
    except UnknownName as exc:
        raise RecipeError(str(exc), key=key) from None


def text_files(files: list[str], *, key: str) -> list[str]:
    check_files(files, key=key)
    return [Path(name).expanduser().read_text(encoding="utf-8", errors="replace") for name in files]


def dataset_texts(
    name: str, config: str | None, split: str, field: str, *, key: str, data_files: str | None = None
) -> list[str]:
    """A ``datasets`` dataset saved with ``save_to_disk`` (a directory) or a hub id (needs network)."""
    import datasets

    try:
        if Path(name).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
        else:
            files = {split: data_files} if data_files else None
            loaded = datasets.load_dataset(name, config, split=split, data_files=files)
    except Exception as exc:  # datasets raises many types (offline, missing, bad config): one line
        raise RecipeError(f"cannot load dataset {name!r}: {str(exc).splitlines()[0]}", key=key) from None
    if field not in loaded.column_names:
        raise RecipeError(
            f"dataset {name!r} has no column {field!r} (columns: {', '.join(loaded.column_names)})",
            key=key.rsplit(".", 1)[0] + ".text_field",
        )
    return [text for text in loaded[field] if text and text.strip()]


def check_corpus(name: str, *, key: str) -> None:
    """Fail early (e.g. under --dry-run) on a corpus that is neither builtin nor an existing file."""
    if name not in BUILTIN and name not in ONLINE and not Path(name).expanduser().is_file():
        choices = ", ".join([*BUILTIN.names(), *ONLINE])
        raise RecipeError(f"unknown corpus {name!r}: use one of {choices}, or a text file path", key=key)


def check_files(files: list[str], *, key: str) -> None:
    for index, name in enumerate(files):
        if not Path(name).expanduser().is_file():
            raise RecipeError(f"file not found: {name}", key=f"{key}.{index}")


def resolve_corpus(name: str, *, key: str) -> list[str]:
    """An evaluation corpus by name: a builtin corpus or a text file path."""
    check_corpus(name, key=key)
    if name in BUILTIN:
        return builtin_corpus(name, key=key)
    if name in ONLINE:
        dataset, config, split, field, files = ONLINE[name]
        return dataset_texts(dataset, config, split, field, key=key, data_files=files)
    return text_files([name], key=key)
