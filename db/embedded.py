"""The embedded PostgreSQL default (the `pgserver` package), used when no database URL is set.

The server's files live in `<data_dir>/postgres`; it listens on a Unix socket only. Several
processes of ours may share it: pgserver counts the processes using it and stops the server
when the last one exits.
"""

from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def embedded_database_url(pgdata: Path) -> str:
    """Start (or join) the embedded server in `pgdata` and return its connection URL."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (normal on servers and in CI).
        warnings.simplefilter("ignore")
        import pgserver

    pgdata = Path(pgdata).absolute()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    log.info("using the embedded PostgreSQL in %s", pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


def stop_embedded(pgdata: Path, timeout: float = 30) -> bool:
    """Stop the embedded server in `pgdata` now (a fast shutdown: SIGINT to its postmaster),
    whichever processes still use it; True if one was running. For a caller that is about to
    delete `pgdata` (`hps demo`'s temporary folder): pgserver stops it only when this process
    exits, after its files would be gone."""
    pid_file = Path(pgdata).absolute() / "postmaster.pid"
    try:
        process = psutil.Process(int(pid_file.read_text().splitlines()[0]))
        if not process.name().startswith("postgres"):
            return False  # a stale pid file whose number another process has now
        log.info("stopping the embedded PostgreSQL in %s", pgdata)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            log.warning("the embedded PostgreSQL did not stop within %ss: killed", timeout)
            process.kill()
            process.wait(timeout)
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return False  # no pid file, or no such process: nothing runs
    return True
