"""The runner's Hydra plugins (launchers.py): its sweeper, and its launchers `local` and `ray`."""
