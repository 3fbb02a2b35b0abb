"""Prefect flows: one per DVC stage (`python -m flows.<stage>`), plus `flows.data` for all four."""
