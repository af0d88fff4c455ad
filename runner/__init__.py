"""`python -m runner`: the config-driven runner (Hydra config groups, sweeps, MLflow) on top of `pipelines`."""
