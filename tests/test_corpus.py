"""Text sources and token windows."""

from __future__ import annotations

import pytest
import torch

from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import CalibrationSpec
from prunecomp_export.source import corpus
from prunecomp_export.source.calibration import calibration_documents, random_windows, spaced_windows


def test_wikipedia_split_by_article_is_disjoint_and_complete():
    calibration = corpus.BUILTIN.get("gensim-wiki")()
    heldout = corpus.BUILTIN.get("gensim-wiki-heldout")()
    assert len(calibration) > 40 and len(heldout) > 40
    assert not set(calibration) & set(heldout)
    assert calibration + heldout == list(corpus.wikipedia_articles())
    assert "anarchism" in calibration[0].lower()  # real text, markup stripped
    assert "[[" not in calibration[0][:2000]


def test_news_corpus_is_real_text():
    news = corpus.BUILTIN.get("gensim-news")()
    assert len(news) > 200 and all(len(article) > 100 for article in news[:20])


def test_random_windows_are_seeded_and_spaced_windows_do_not_overlap():
    tokens = torch.arange(1000)
    a, b = random_windows(tokens, 8, 50, seed=0), random_windows(tokens, 8, 50, seed=0)
    assert torch.equal(a, b) and a.shape == (8, 50)
    assert not torch.equal(a, random_windows(tokens, 8, 50, seed=1))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 50)) for w in a)  # contiguous slices
    spaced = spaced_windows(tokens, 100, 4)
    starts = spaced[:, 0].tolist()
    assert starts == [0, 300, 600, 900]
    assert spaced_windows(tokens, 100, None).shape == (10, 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        spaced_windows(tokens, 2000, None)


def test_calibration_from_a_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["first document", "", "second document"]}).save_to_disk(tmp_path / "ds")
    spec = CalibrationSpec(source="dataset", dataset=str(tmp_path / "ds"), text_field="content")
    assert calibration_documents(spec) == ["first document", "second document"]
    with pytest.raises(RecipeError, match=r"calibration\.text_field: .*no column .text."):
        calibration_documents(CalibrationSpec(source="dataset", dataset=str(tmp_path / "ds")))


def test_unknown_builtin_corpus_suggests_a_name():
    with pytest.raises(RecipeError, match=r"unknown corpus .gensim-new.: use one of"):
        corpus.resolve_corpus("gensim-new", key="evaluation.perplexity.corpora.0")
