"""Presentation: tables, prose and figures written from results alone, never recomputing them. `study`
renders a study's report.md / report.html and its plots from results.json; `averaging` the BMA table,
section and figure; `barriers` one barrier curve's figure."""

from .study import write_report

__all__ = ["write_report"]
