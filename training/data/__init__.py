"""Datasets available offline, with deterministic, recorded splits."""
