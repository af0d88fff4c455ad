"""How a run is executed: a job computed (job.py), one job placed (run.py: skipped, warm or here),
a sweep checked, run and finished (sweep.py), on Ray (ray/) or warm workers (warm/)."""
