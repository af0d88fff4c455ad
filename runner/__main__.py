"""`python -m runner [overrides]` / `python -m runner -m [sweep overrides]`, and the commands

    python -m runner download [overrides]         fetch the files a run needs, run nothing
    python -m runner report SWEEP_DIR [x=...]     the X/Y grid and HTML report of a sweep
    python -m runner report --run PARENT_RUN_ID   ... from its MLflow parent run
    python -m runner warm status|stop             the workers that keep weights loaded
    python -m runner --help                       what the runner does, the config groups
    python -m runner sync DIR [overrides]         log a sweep or run folder into MLflow (idempotent)
    python -m runner cleanup [overrides] [--dir DIR]   end RUNNING runs of dead processes as KILLED,
                                                  remove leftovers of interrupted writes

Exit status: 0 when every job finished (or was skipped by resume=true); 1 when a job failed
(the failed jobs are listed), the sweep's grid, report or job table could not be written,
an output folder cannot be written (full disk, read-only), or a download failed; 2 for a
config refused before any job (a key that does not compose or validate, in any job of a
sweep; a deleted experiment; an output folder already used): no MLflow run is created then;
3 when every job finished but some could not be tracked in MLflow (images and job.json are
in place: `python -m runner sync DIR`); 130 on Ctrl-C / SIGTERM. Every MLflow run this process
opened is ended first; a second Ctrl-C only hurries that.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys

from .commands import COMMANDS, command
from .config import CONF_DIR
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_UNTRACKED, Stop

logger = logging.getLogger("runner")


HELP = """\
python -m runner: generate images with a diffusion model (the Qwen-Image family) from a Hydra
config, one MLflow run per image, and sweeps with a grid and an HTML report to compare them.

  python -m runner [KEY=VALUE ...]        one image (outputs/runs/<date>/<time>/image.png)
  python -m runner -m [KEY=A,B ...]       a sweep: every combination of the comma-separated values
  python -m runner model=qwen_image_tiny sampler=tiny    the demo: a tiny model built offline on first use
  python -m runner model=qwen_image_tiny sampler=tiny controlnet=tiny_demo    ... with a tiny ControlNet

Config groups (conf/<group>/<option>.yaml; pick one with GROUP=OPTION):
{groups}

Keys: any key of the composed config (sampler.steps=20, lora.alpha=0.8, vram.vram_limit=12,
  "prompt=a red fox"); call.NAME=VALUE for any other argument of the pipeline's call.
  prompt and negative_prompt are taken as typed (a ${{...}} in them is text, not an interpolation).
  seed=N (default 0); seed=null draws a random seed per job, logged as the run's runtime.seed.
  python -m runner --cfg job [overrides]    print the composed config (every key and its value)

Sweeps: python -m runner -m model=qwen_image_tiny sampler=tiny lora=tiny_demo lora.alpha=0,0.5,1 seed=0,1
  Jobs run one after another, weights loaded once. The sweep folder (outputs/multirun/<date>/<time>)
  gets jobs.csv, grid.png (axes: report.x=KEY report.y=KEY report.z=KEY) and report.html.
  resume=true skips the jobs whose identical config already has a FINISHED run.

Commands:
  download [overrides]                  fetch the files a run needs, run nothing
  report SWEEP_DIR [x=KEY y=KEY z=KEY]  rebuild a sweep's grid and report.html
  report --run PARENT_RUN_ID [--tracking-uri URI]   the same from a sweep's MLflow parent run
  sync DIR [overrides]                  log a sweep or run folder into MLflow (idempotent)
  cleanup [overrides] [--dir DIR]       end RUNNING runs of dead processes as KILLED
  warm status|stop                      the workers that keep weights loaded (keep_warm=15m)

MLflow: runs go to outputs/mlflow/mlflow.db; open the UI with
  mlflow ui --backend-store-uri sqlite:///outputs/mlflow/mlflow.db

Hydra's own options (--multirun, --cfg, --resolve, --info, ...): python -m runner --hydra-help
Exit status: 0 done, 1 a job failed, 2 config refused (no run created), 3 not all tracked, 130 Ctrl-C.
"""


def config_groups(conf_dir: str = str(CONF_DIR)) -> dict[str, list[str]]:
    """group -> its options, read from the conf/ folders."""
    groups = {}
    for group in sorted(os.listdir(conf_dir)):
        folder = os.path.join(conf_dir, group)
        if os.path.isdir(folder):
            groups[group] = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return groups


def help_text() -> str:
    import textwrap

    lines = [textwrap.fill(", ".join(options), width=100, initial_indent=f"  {group + ':':<10}",
                           subsequent_indent=" " * 12) for group, options in config_groups().items()]
    return HELP.format(groups="\n".join(lines))


def cli() -> int:
    # MLflow 3 reports usage to its makers unless told not to: nothing leaves this machine
    # unasked (as for Ray's runtime); MLFLOW_DISABLE_TELEMETRY=false turns it back on
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # no progress bar per artifact MLflow fetches (`report --run` fetches each job's image: one bar
    # each); MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true turns them back on
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if sys.argv[1:2] and sys.argv[1] in COMMANDS:
        return command(sys.argv[1], sys.argv[2:])
    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # ours, without importing Hydra, torch or MLflow
        print(help_text(), end="")
        return EXIT_OK
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks
    user_full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's config errors reach us: reported below with the key and fix
    from .app import STATE, abort, main
    from .execution.state import close_recorders, interrupt_handler
    from .records import FAILED, KILLED

    signal.signal(signal.SIGINT, interrupt_handler)
    signal.signal(signal.SIGTERM, interrupt_handler)
    try:
        main()
    except KeyboardInterrupt:
        logger.error("Interrupted: ending the open MLflow runs as KILLED")
        abort(KILLED)
        return EXIT_INTERRUPTED
    except Stop as stop:
        STATE.stopping = True
        abort(FAILED)
        also = f" (not written either: {', '.join(STATE.problems)} in the sweep folder)" if STATE.problems else ""
        logger.error("%s%s", stop.message, also)
        return stop.code
    except SystemExit as e:  # Hydra's own exit (--help, a bad flag)
        abort(FAILED)
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
        if code:
            return code
    except Exception as error:  # noqa: BLE001 - reported in one line when it is a config or disk error
        abort(FAILED)
        return _report(error, user_full_error)
    close_recorders(FAILED)  # waits for the last writes; ends what was left open
    return _exit_status(STATE)


def _report(error: Exception, user_full_error: str | None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config.checks import omegaconf_error
    from .config.compose import composition_error
    from .errors import is_storage_error

    if isinstance(error, HydraException) and not user_full_error:
        logger.error("%s", composition_error(error, [a for a in sys.argv[1:] if not a.startswith("-")]))
        return EXIT_REFUSED
    if isinstance(error, OmegaConfBaseException) and not user_full_error:  # Hydra resolving its own keys
        logger.error("%s", omegaconf_error(error))
        return EXIT_REFUSED
    if is_storage_error(error) and not user_full_error:
        logger.error("%s: %s (errno %s)", getattr(error, "filename", "") or "output", error.strerror, error.errno)
        return EXIT_FAILED
    raise error


def _exit_status(state) -> int:
    if state.failed:
        listing = "\n".join(f"  job {r.num} [{' '.join(r.overrides) or 'defaults'}]: {r.error}" for r in state.failed)
        logger.error("%d job(s) failed:\n%s", len(state.failed), listing)
        return EXIT_FAILED
    if state.problems:
        return EXIT_FAILED
    if state.untracked:
        return EXIT_UNTRACKED
    return EXIT_OK


_exit_code = [EXIT_FAILED]  # what `cli` returned: the status the process ends with


def _skip_teardown() -> None:
    """The last exit handler (registered first): everything is written and every other handler
    has run (multiprocessing's, Ray's, ...); end the process without the interpreter's teardown,
    whose unloading of torch's modules takes ~1.3 s of every command on a 2-core machine."""
    logging.shutdown()  # logging's own handler was registered before this one: it would not run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code[0])


if __name__ == "__main__":
    atexit.register(_skip_teardown)
    _exit_code[0] = cli()
    sys.exit(_exit_code[0])
