"""The only MLflow code: the store, what a run holds, the writer process of a run or sweep, `sync` and
`cleanup`, provenance, and fetching a sweep's jobs back for `report --run`."""
