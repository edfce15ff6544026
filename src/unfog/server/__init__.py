"""``unfog serve``: an HTTP server speaking AUTOMATIC1111's API (``app``), over the job layer
(``unfog.jobs``) with a queue (``worker``), the files it offers by name (``library``) and A1111's
request and response shapes (``a1111``). Needs FastAPI and uvicorn (``pip install unfog[serve]``)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """``--api-auth user:pass[,user2:pass2]`` -> ((user, pass), ...)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        if ":" not in item:
            raise ValueError(f"--api-auth {item!r} has no colon; give user:password (several: user:pw,user2:pw2)")
        user, password = item.split(":", 1)
        if not user or not password:
            raise ValueError(f"--api-auth {item!r}: both the user and the password must be non-empty")
        pairs.append((user, password))
    return tuple(pairs)


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's log lines later, if the port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another server?); pick another with --port"
                                 ) from None
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def serve(config, host: str = "127.0.0.1", port: int = 7860, ready=None) -> None:
    """Run the server until Ctrl-C. ``ready``: called with the bound (host, port) once it listens."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("unfog serve needs FastAPI and uvicorn: pip install 'unfog[serve]'") from None
    from .app import create_app

    check_port_free(host, port)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    print(f"unfog: serving {Path(config.library.default).name} on http://{host}:{port} (A1111 API at /sdapi/v1)")
    if ready is not None:
        ready(host, port)
    server.run()
