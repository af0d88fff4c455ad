"""Comparing a sweep's jobs: the X/Y(/Z) grid of their images and report.html, from a sweep
folder or a sweep that just ended (docs/report.md). No MLflow here: `report --run` fetches a
parent run's jobs into a folder first (runner.tracking.fetch)."""
