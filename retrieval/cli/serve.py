"""`blipsearch serve`"""

from __future__ import annotations

import errno
import ipaddress
import socket

import click

from ..errors import InvalidInputError
from . import main
from .options import device_option, index_location, index_option, model_option, precision_option


@main.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any but loopback needs --token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--token", envvar="BLIPSEARCH_TOKEN", default=None, metavar="SECRET",
              help="Access token every request must carry (Authorization: Bearer SECRET, or ?token=SECRET "
                   "once in the page's address). Default: $BLIPSEARCH_TOKEN.")
@model_option("Model to query with. Default: the one the index was built with.")
@device_option
@precision_option
def serve_command(index_path, host, port, token, model_name, device, precision):
    """Serve the search page and a JSON API (its OpenAPI schema at /openapi.json) over the index, until Ctrl-C.

    The model loads once; a finished `blipsearch index` run in another process is picked up by the next
    request. Only indexed files are ever served.
    """
    if not _loopback(host) and not token:
        raise InvalidInputError(f"--host {host} is reachable from other machines: set an access token with "
                                "--token or BLIPSEARCH_TOKEN")
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as exc:
        raise InvalidInputError(f"`blipsearch serve` needs the serve extra ({exc.name} is missing): "
                                "pip install -e '.[serve]' in the blipsearch checkout") from exc
    import platformdirs

    from ..api import Index

    location = index_location(index_path)
    listening = _bind(host, port)  # before the model loads: a port in use is one line at once
    index = Index.open(location, model_name, device, precision, with_vision=True)
    # with a token, any name may reach it; without, only loopback names (the bound address among them)
    hosts = (*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host) if _loopback(host) and not token else None
    app = create_app(index, platformdirs.user_cache_path("blipsearch") / "thumbnails", token, hosts)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"blipsearch: serving {location} at http://{shown}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(sockets=[listening])


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it; `InvalidInputError` naming the option where it
    cannot be (uvicorn alone said so after the "serving" line, with exit status 3)."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # uvicorn's rule
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
    except socket.gaierror as exc:
        listening.close()
        raise InvalidInputError(f"--host {host}: {exc.strerror or exc}") from exc
    except OSError as exc:
        listening.close()
        hint = "; stop the other server or pass another --port" if exc.errno == errno.EADDRINUSE else ""
        raise InvalidInputError(f"--port {port} on {host}: {exc.strerror or exc}{hint}") from exc
    return listening


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False
