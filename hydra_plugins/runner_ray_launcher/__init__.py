"""The runner's Hydra plugins (launchers.py): its sweeper, and its launchers `local` and `ray`.

The folder keeps the name it had when it held the Ray launcher alone: a stale install of an
older runner then has its plugin shadowed by this one, instead of registering `ray` beside it."""
