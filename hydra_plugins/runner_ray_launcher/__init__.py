"""The runner's Hydra launcher `ray` (ray_launcher.py); docs/ray.md."""
