"""The arguments of `python -m runner report SWEEP_DIR|--run PARENT_RUN_ID [x=KEY] [y=KEY] [z=KEY]
[thumb=N] [title=TEXT]`, and a rebuild's files written beside the sweep's own, named by their axes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .html import ReportFiles, write_report
from .jobs import JobList, ReportError, jobs_from_sweep_dir

USAGE = ("usage: python -m runner report SWEEP_DIR|--run PARENT_RUN_ID [--tracking-uri URI] [--out DIR] "
         "[x=KEY|none] [y=KEY|none] [z=KEY|none] [thumb=N] [title=TEXT]")
DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow/mlflow.db"  # the runner's default store (conf/tracking/mlflow.yaml)


@dataclass
class ReportArgs:
    folder: Optional[str] = None
    run: Optional[str] = None
    tracking_uri: str = DEFAULT_TRACKING_URI
    out: Optional[str] = None
    options: dict[str, str] = field(default_factory=dict)

    def out_dir(self) -> Path:
        """Where the rebuilt files go: the sweep folder, or --out (default outputs/reports/<run id>)."""
        if self.folder is not None:
            return Path(self.folder)
        return Path(self.out or Path("outputs") / "reports" / str(self.run))


def parse_args(argv: Sequence[str]) -> ReportArgs:
    """The command line; ReportError for an argument it does not take."""
    args = ReportArgs()
    flags = {"--run": "run", "--tracking-uri": "tracking_uri", "--out": "out"}
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        flag, eq, inline = arg.partition("=")
        if flag in flags:
            if not eq and not argv:
                raise ReportError(f"{flag} needs a value ({USAGE[7:]})")
            setattr(args, flags[flag], inline if eq else argv.pop(0))
            continue
        key, eq, value = arg.partition("=")
        if eq and key in ("x", "y", "z", "thumb", "title"):
            args.options[key] = value
        elif args.folder is None and not arg.startswith("-") and not (eq and key.isidentifier()):
            args.folder = arg
        else:
            raise ReportError(f"unexpected argument {arg!r} ({USAGE[7:]})")
    if (args.folder is None) == (args.run is None):
        raise ReportError(f"give a sweep folder or --run PARENT_RUN_ID, not {'both' if args.folder else 'neither'} "
                          f"({USAGE[7:]})")
    thumb_of(args.options)
    return args


def thumb_of(options: Mapping[str, str]) -> int:
    try:
        thumb = int(options.get("thumb", "256"))
    except ValueError:
        raise ReportError(f"thumb={options['thumb']!r}: give a size in pixels, e.g. thumb=256") from None
    if not 32 <= thumb <= 2048:
        raise ReportError(f"thumb={thumb}: choose between 32 and 2048 pixels")
    return thumb


def jobs_of_folder(folder: Path) -> JobList:
    """The jobs of a sweep folder; ReportError when it lists none."""
    jobs = jobs_from_sweep_dir(Path(folder))
    if not jobs:
        raise ReportError(f"{Path(folder) / 'jobs.csv'} lists no jobs")
    return jobs


def rebuild(jobs: JobList, args: ReportArgs) -> ReportFiles:
    """The grid(s) and the page with the command's axes, named by them (`grid_x=seed_y=lora.alpha.png`,
    `report_x=seed_y=lora.alpha.html`): never over the sweep's own grid.png and report.html, nor
    over a rebuild with other axes."""
    options = args.options
    return write_report(jobs, args.out_dir(), x=options.get("x") or None, y=options.get("y") or None,
                        z=options.get("z") or None, thumb=thumb_of(options), title=options.get("title"),
                        by_axes=True)
