"""Links to the Prefect UI that work: which API a server's UI calls, and how to make it its own.

`prefect server start --port N` serves the API on N, but its UI asks the browser to call the
API at PREFECT_SERVER_UI_API_URL, which defaults to PREFECT_API_URL or else to
http://PREFECT_SERVER_API_HOST:PREFECT_SERVER_API_PORT/api (4200) -- not N. Every page then
shows "Something went wrong". `flows.local_prefect` starts its servers with the port and
UI API URL set; `ui_problem` tells a client whether the server behind its PREFECT_API_URL
serves a UI that calls it, so `deploy` prints a link only when the link works.
"""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

# One machine, several spellings: a browser there reaches the same server through each.
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def ui_url(api_url: str) -> str:
    """The UI root of a self-hosted server, from its API URL (`.../api` removed)."""
    url = api_url.rstrip("/")
    return url[: -len("/api")] if url.endswith("/api") else url


def client_ui_url() -> str | None:
    """The UI this process's Prefect settings point at (PREFECT_UI_URL, else from the API URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    explicit = PREFECT_UI_URL.value()
    if explicit:
        return explicit.rstrip("/")
    api = PREFECT_API_URL.value()
    return ui_url(api) if api else None


def ui_api_url(ui: str, timeout_s: float = 5.0) -> str | None:
    """The API URL the UI at `ui` makes browsers call (its /ui-settings); None without a UI."""
    try:
        with urllib.request.urlopen(f"{ui.rstrip('/')}/ui-settings", timeout=timeout_s) as reply:
            return json.loads(reply.read()).get("api_url")
    except (OSError, ValueError):  # refused, timed out, 404 (no UI), not JSON
        return None


def same_api(a: str, b: str) -> bool:
    """Whether two API URLs reach the same server (loopback spellings are one host)."""
    pa, pb = urlsplit(a.rstrip("/")), urlsplit(b.rstrip("/"))
    hosts = {pa.hostname, pb.hostname}
    same_host = len(hosts) == 1 or hosts <= _LOOPBACK
    return same_host and pa.port == pb.port and pa.path == pb.path and pa.scheme == pb.scheme


def ui_problem(api_url: str, ui: str | None = None) -> str | None:
    """None when the UI beside `api_url` calls that API; else one line: what breaks, the fix."""
    ui = ui or ui_url(api_url)
    called = ui_api_url(ui)
    if called is None or same_api(called, api_url):
        return None  # no UI served there (Prefect Cloud, UI off): nothing to warn about
    port = urlsplit(api_url).port
    return (
        f"the Prefect UI at {ui} calls the API at {called}, not {api_url}, so its pages show "
        f"'Something went wrong'; start the server with PREFECT_SERVER_API_PORT={port} "
        f"(or PREFECT_SERVER_UI_API_URL={api_url}) in its environment instead of --port"
    )
