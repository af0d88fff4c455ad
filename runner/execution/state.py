"""What lives across the jobs of this process: the open recorders, the failed and untracked
jobs, the sweep in progress, and how signals are handled.

The first Ctrl-C / SIGTERM raises KeyboardInterrupt (the job in progress ends KILLED); from
then on, and during the end of a sweep, a signal only sets `hurry`: the writes and run endings
of the shutdown finish (the MLflow writer stops uploading and ends what is open as KILLED),
they are never cut in the middle.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import EXIT_REFUSED, ConfigError, Stop
from ..records import JobRecord
from ..tracking.writer import Recorder, discard_prestarted_writer, prestart_writer

logger = logging.getLogger("runner")


@dataclass
class State:
    sweep: Optional[Any] = None  # runner.execution.sweep.Sweep while a sweep runs
    single: Optional[Any] = None  # runner.app.Single for a single run
    failed: list[JobRecord] = field(default_factory=list)
    untracked: list[JobRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # sweep files that could not be written
    recorders: list[Recorder] = field(default_factory=list)
    hurry: bool = False  # interrupted again during the shutdown
    stopping: bool = False  # ending on a Stop, whose line says what went wrong


STATE = State()


def prestart_recorder(config: Any) -> None:
    """Start the MLflow writer while the config is checked, unless tracking is off
    (runner.tracking.writer.prestart_writer; the recorder opened after the check takes it)."""
    from omegaconf import OmegaConf

    backend = OmegaConf.select(config, "tracking.backend", default=None)
    if backend is not None and str(getattr(backend, "name", backend)) != "none":
        prestart_writer()


def open_recorder(spec: Any) -> Optional[Recorder]:
    """The MLflow recorder of a run or sweep (None with tracking=none). A deleted experiment
    refuses the run (exit 2) before anything happened."""
    from ..config.schema import TrackingBackend

    if spec.tracking.backend is TrackingBackend.none:
        return None
    try:
        recorder = Recorder(spec.tracking, spec.experiment)
    except ConfigError as error:
        raise Stop(str(error), EXIT_REFUSED) from None
    STATE.recorders.append(recorder)
    return recorder


def close_recorders(status: str) -> None:
    """Wait for every MLflow write, end what is still open with `status`."""
    while STATE.recorders:
        STATE.recorders.pop(0).close(status)
    discard_prestarted_writer()


def interrupt_handler(signum: int, frame: Any) -> None:  # noqa: ARG001
    """The first Ctrl-C / SIGTERM: stop the job in progress."""
    shield()
    raise KeyboardInterrupt(f"signal {signum}")


def _again(signum: int, frame: Any) -> None:  # noqa: ARG001
    if not STATE.hurry:
        STATE.hurry = True
        for recorder in STATE.recorders:
            recorder.hurry = True
        logger.warning("Interrupted again: finishing the shutdown now (open runs end KILLED, no more uploads)")


def shield() -> None:
    """From here on a signal does not raise: the end-of-sweep writes and run endings finish."""
    if signal.getsignal(signal.SIGINT) is not _again:
        try:
            signal.signal(signal.SIGINT, _again)
            signal.signal(signal.SIGTERM, _again)
        except ValueError:  # not the main thread
            pass
