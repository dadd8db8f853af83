"""A real nginx (Debian's /usr/sbin/nginx) serving a folder on 127.0.0.1, started by a test without root.

Everything it writes (pid, logs, temp folders) lives under the test's temporary folder. The access log records
each request's status, the bytes sent and the Range header, so a test (or the benchmark) can count requests and
bytes exactly. ``extra`` adds server-block directives: fault locations (``location /fail/ { return 500; }``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

LOG_FORMAT = '$status $bytes_sent $request_method $uri "$http_range"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_available() -> bool:
    return os.access(NGINX, os.X_OK)


class Nginx:
    """nginx serving ``root`` at http://127.0.0.1:<port>/; ``start``/``stop`` as often as a test needs."""

    def __init__(self, root: Path, workdir: Path, extra: str = "", port: int | None = None) -> None:
        self.root, self.workdir, self.extra = Path(root), Path(workdir), extra
        self.port = port or free_port()
        self.access_log = self.workdir / "access.log"
        self.conf = self.workdir / "nginx.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        w = self.workdir
        for d in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
            (w / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format loupe '{LOG_FORMAT}';
    access_log {self.access_log} loupe;
    client_body_temp_path {w}/client;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        {self.extra}
    }}
}}
"""
        )

    def start(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self.process = subprocess.Popen(
            [NGINX, "-c", str(self.conf), "-p", str(self.workdir), "-e", str(self.workdir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nginx exited: {self.process.stderr.read().decode() if self.process.stderr else ''}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def requests(self) -> list[tuple[int, int, str, str, str]]:
        """(status, bytes sent, method, path, Range header) of every request logged so far."""
        rows = []
        if not self.access_log.exists():
            return rows
        for line in self.access_log.read_text().splitlines():
            status, sent, method, uri, rng = line.split(" ", 4)
            rows.append((int(status), int(sent), method, uri, rng.strip('"')))
        return rows

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
