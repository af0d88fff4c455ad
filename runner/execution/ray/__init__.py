"""Sweeps on a pool of long-lived Ray actors (`hydra/launcher=ray`): its settings, the pool, the
worker actor; docs/ray.md."""
