"""Compatibility-aware, latency-constrained search with Optuna."""
