"""`loupe view`: serve a folder's viewer with uvicorn on a local port until Ctrl-C."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Iterator
from pathlib import Path

from loupe.errors import ConfigError

EXTRA = "loupe[viewer]"
#: Hosts that only this machine can reach.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def require_viewer() -> None:
    """Refuse, in one message naming the extra, when the web parts are not installed."""
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(
            f"`loupe view` needs {' and '.join(missing)}, which the base install leaves out: pip install '{EXTRA}'"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port) and listening; a port in use is one message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --port, or none") from err
    sock.listen(128)
    return sock


def host_warning(host: str) -> str | None:
    """The warning printed when the viewer is reachable from other machines."""
    if host in LOOPBACK:
        return None
    return (
        f"warning: --host {host} serves the slides and predictions to anyone who can reach this machine on the "
        "network; the viewer has no login. Use the default (127.0.0.1) or an SSH tunnel unless that is intended."
    )


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def view(
    folder: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    open_browser: bool = False,
    split: str | None = None,
) -> None:
    """Serve the viewer of ``folder`` (a predict output folder or a run folder) until interrupted."""
    require_viewer()
    import uvicorn

    from loupe.viewer.app import create_app
    from loupe.viewer.cohort import open_cohort

    cohort = open_cohort(folder, split=split)
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 0..65535 (0 or nothing: a free port)")
    sock = listening_socket(host, port or 0)  # bound before the URL is printed: it answers once printed
    port = int(sock.getsockname()[1])
    warning = host_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    url = url_of(host, port)
    rows = cohort.rows()
    print(f"loupe view: {len(rows)} slides of {cohort.title} at {url}  (Ctrl-C stops)", flush=True)
    app = create_app(cohort)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server.run(sockets=[sock])  # uvicorn handles SIGINT/SIGTERM itself and returns after a clean shutdown


@contextlib.contextmanager
def background_server(folder: str | Path, *, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """The viewer of ``folder`` served from a thread of this process while the block runs; yields its URL
    (for scripts and tests that drive a browser)."""
    require_viewer()
    import uvicorn

    from loupe.viewer.app import create_app
    from loupe.viewer.cohort import open_cohort

    port = port or free_port(host)
    cohort = open_cohort(folder)
    cohort.rows()  # read before serving, as `loupe view` does
    config = uvicorn.Config(create_app(cohort), host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="loupe-view", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the viewer did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield url_of(host, port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
