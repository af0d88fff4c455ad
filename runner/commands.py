"""The commands beside a run: `python -m runner download|report|sync|cleanup|warm ...`; each one
composed from the rooms below (runner/__main__.py lists them, docs/ the details)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, ConfigError

logger = logging.getLogger("runner")

COMMANDS = ("report", "download", "sync", "cleanup", "warm")


def command(name: str, argv: list[str]) -> int:
    """Run the command `name` (one of COMMANDS) with its arguments; its exit status."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if name == "report":
        return report_main(argv)
    if name == "download":
        return download_main(argv)
    if name == "warm":
        from .execution.warm.worker import warm_main

        return warm_main(argv)
    from .tracking import sync

    return sync.sync_main(argv) if name == "sync" else sync.cleanup_main(argv)


def download_main(overrides: list[str]) -> int:
    """`python -m runner download [overrides]`: every file a run of this config needs (model,
    tokenizer, hub LoRAs) fetched, nothing generated; the same overrides as a run. 2 for a config
    refused, 1 when a download failed."""
    from .build import arguments
    from .build import pipeline as build
    from .config.checks import to_spec, validate
    from .config.compose import compose

    build.register_resolvers()
    try:
        spec = to_spec(compose(overrides))
        validate(spec)
        arguments.preflight(spec)
    except ConfigError as error:
        logger.error("%s", error)
        return EXIT_REFUSED
    try:
        build.fetch_all(spec)
    except (OSError, ValueError) as error:  # DownloadError, a corrupt file, a bad variable
        logger.error("%s", error)
        return EXIT_FAILED
    return EXIT_OK


def report_main(argv: Sequence[str]) -> int:
    """`python -m runner report SWEEP_DIR [x=KEY] [y=KEY] [z=KEY] [thumb=N] [title=TEXT]`: rebuild
    the grid(s) and the report of a sweep folder from its jobs.csv (or its job folders); with
    `--run PARENT_RUN_ID [--tracking-uri URI] [--out DIR]` from a sweep's MLflow parent run (its
    children's images are downloaded into DIR, default outputs/reports/<run id>), and the new
    files are logged to that parent run. The files are named by their axes
    (`grid_x=seed_y=lora.alpha.png`, `report_x=seed_y=lora.alpha.html`): a rebuild never
    replaces the sweep's own grid.png and report.html, nor a rebuild with other axes. 0 when
    written, 2 (one line on stderr) for a missing folder or run, no jobs, an unknown axis key
    or a bad argument, 1 when the files could not be logged to the parent run."""
    from .reporting.cli import USAGE, jobs_of_folder, parse_args, rebuild
    from .reporting.jobs import ReportError

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_REFUSED
    try:
        args = parse_args(argv)
        if args.run is None:
            jobs = jobs_of_folder(Path(args.folder))
        else:
            jobs = jobs_from_mlflow(args.tracking_uri, args.run, args.out_dir())
        files = rebuild(jobs, args)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return EXIT_REFUSED
    for path in files.all:
        print(path)
    if args.run is None:
        return EXIT_OK
    from .tracking.fetch import log_files

    names = ", ".join(p.name for p in files.all)
    problem = log_files(args.tracking_uri, args.run, files.all)
    if problem is not None:
        print(f"report: could not log {names} to run {args.run} in {args.tracking_uri}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report: logged {names} to run {args.run} in {args.tracking_uri}", file=sys.stderr)
    return EXIT_OK


def jobs_from_mlflow(tracking_uri: str, parent_run_id: str, dst: Path):
    """The jobs of a sweep's MLflow parent run (a reporting.jobs.JobList): its children fetched
    into the folder `dst` (runner.tracking.fetch), read back as a sweep folder is, titled with the
    parent's name and overrides. ReportError when there is no such store, run or child run."""
    from .reporting.jobs import ReportError, jobs_from_sweep_dir
    from .tracking.fetch import FetchError, fetch_sweep

    try:
        fetched = fetch_sweep(tracking_uri, parent_run_id, dst)
    except FetchError as error:
        raise ReportError(str(error)) from None
    jobs = jobs_from_sweep_dir(fetched.folder)
    jobs.title, jobs.overrides = fetched.title, fetched.overrides
    return jobs
