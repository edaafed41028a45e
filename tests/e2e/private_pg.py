"""A PostgreSQL server a test owns, so that it can stop and start it (the machine's shared
server is never touched): pgserver's bundled binaries, a temporary folder, TCP on loopback.
As root, PostgreSQL refuses to run, so the server runs as the `pgserver` user, as pgserver
itself does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs (imported by pgserver) warns that XDG_RUNTIME_DIR is unset.
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_user_exists


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivatePostgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hps-pg-"))
        self.root.chmod(0o755)
        self.pgdata = self.root / "data"
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            ensure_user_exists("pgserver")
            self.user = "pgserver"
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        # pg_ctl's server inherits its output: never capture it (the call would hang).
        subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def init(self) -> None:
        self.pgdata.mkdir(mode=0o700)
        if self.user is not None:
            shutil.chown(self.pgdata, self.user, self.user)
        self._run("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self, *, fsync: bool = False) -> None:
        """Start the server: without fsync unless asked (tests need no durability; a
        benchmark measures with it, as in production)."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}" + ("" if fsync else " -F")
        log = str(self.pgdata / "server.log")
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-l", log, "-o", options, "start")
        self.running = True

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", "fast", "stop")
        self.running = False

    def cleanup(self) -> None:
        if self.running:
            try:
                self.stop()
            except subprocess.SubprocessError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
