"""Accuracy of a model variant: held-out perplexity and zero-shot QA through lm-evaluation-harness."""
