"""Evaluation: perplexity by a stated protocol and zero-shot commonsense tasks."""
