"""The embedded PostgreSQL default (the `pgserver` package), used when no database URL is set.

The server's files live in `<data_dir>/postgres`; it listens on a Unix socket only. Several
processes of ours may share it: pgserver counts the processes using it and stops the server
when the last one exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

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
