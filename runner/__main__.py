"""`python -m runner [overrides]` / `python -m runner -m [sweep overrides]` /
`python -m runner download [overrides]` (fetch the files a run needs, run nothing).

Exit status: 0 when every job finished (or was skipped by resume=true), 1 when a job
failed (the failed jobs are listed) or a download failed, 2 for a sweep or download
refused on its configuration before any job, 130 on Ctrl-C / SIGTERM, Hydra's own status
for a config that does not compose. Every MLflow run this process opened is ended first.
"""
from __future__ import annotations

import logging
import signal
import sys

from .app import STATE, abort, finish_sweep, main
from .tracking import FAILED, KILLED

logger = logging.getLogger("runner")


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def cli() -> int:
    if sys.argv[1:2] == ["report"]:
        from .compare import report_main

        return report_main(sys.argv[2:])
    if sys.argv[1:2] == ["download"]:
        from .download import download

        return download(sys.argv[2:])
    signal.signal(signal.SIGTERM, _sigterm)
    code = 0
    try:
        main()
    except KeyboardInterrupt:
        logger.error("Interrupted: ending the open MLflow runs as KILLED")
        abort(KILLED)
        return 130
    except SystemExit as e:  # Hydra's exit on a config error, or ours
        code = e.code if isinstance(e.code, int) else 1
        abort(FAILED)
        if code:
            return code
    except BaseException:  # HYDRA_FULL_ERROR=1 or a debugger re-raises instead of exiting
        abort(FAILED)
        raise
    finish_sweep()  # done by the sweep callback's on_multirun_end; here if it was removed
    abort(FAILED)  # no-op unless something was left open
    if STATE.failed:
        listing = "\n".join(f"  job {r.num} [{' '.join(r.overrides) or 'defaults'}]: {r.error}" for r in STATE.failed)
        logger.error("%d job(s) failed:\n%s", len(STATE.failed), listing)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(cli())
