"""Helpers only tests (and benchmarks) use: a loopback ModelScope/HuggingFace hub, random weights
for the reference implementations' modules. Nothing here ships: the installed packages are
`pipelines`, `runner` and `hydra_plugins`."""
