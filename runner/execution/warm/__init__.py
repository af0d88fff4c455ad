"""Weights kept loaded across commands (`keep_warm`): the workers' folder, their protocol, the
command's side (client) and the worker's; docs/warm.md."""
