"""Thin Prefect tasks: file I/O around calls into the `iga` library."""
