"""Measured latency of the dense and pruned models on each runtime."""
