"""Reaching the Hugging Face hub, or knowing at once that it cannot be reached.

Without network, ``from_pretrained`` of a hub id retries for about a minute before it fails. A
user who forgot a download, or who works on an offline cluster node, should hear that at once
and what to do about it. So before a hub id is loaded:

* with ``HF_HUB_OFFLINE`` set, only the local cache is used; an id that is not in it is an
  error right away;
* otherwise one short TCP connection to the hub endpoint (``HF_ENDPOINT``, or the HTTPS proxy
  when one applies) tells whether the hub is reachable; the answer is kept for the process.
  Unreachable: an id in the local cache loads from it (``local_files_only``), any other is an
  error naming the id and how to get it onto this machine.
"""

from __future__ import annotations

import functools
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from automodel_cli.errors import UserError

PROBE_TIMEOUT_S = 3.0


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` is set: the hub is never contacted."""
    from huggingface_hub import is_offline_mode

    return bool(is_offline_mode())


def cached_snapshot(repo_id: Any, revision: str | None = None) -> Path | None:
    """The local cache's snapshot directory of ``repo_id`` at ``revision``, or None when it
    is not cached (never downloads)."""
    if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id
        return None


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _probe_address(url: str) -> tuple[str, int]:
    """The host and port a request to ``url`` connects to first (the proxy when one applies)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


@functools.lru_cache(maxsize=None)
def unreachable_reason(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host cannot be reached (None when a TCP connection succeeds).

    Name resolution has no timeout of its own, so the connection is made in a thread that is
    abandoned after ``timeout`` seconds. Cached per process: one probe per endpoint.
    """
    host, port = _probe_address(url)
    if not host:
        return f"`{url}` has no host name"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except socket.gaierror:
            outcome.append(f"the name {host} cannot be resolved")
        except (socket.timeout, TimeoutError):
            outcome.append(f"no answer from {host}:{port} within {timeout:g} s")
        except OSError as exc:
            outcome.append(f"connecting to {host}:{port} failed: {exc.strerror or exc}")

    thread = threading.Thread(target=connect, daemon=True, name="automodel-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"


def _download_hint(repo_id: str, key: str) -> str:
    return (f"On a machine with network run `hf download {repo_id} --local-dir DIR`, copy DIR here and "
            f"set {key}=DIR. If the model is in a Hugging Face cache on this machine, point HF_HOME at it "
            f"(HF_HUB_OFFLINE=1 then loads it without contacting the hub).")


def hub_access(repo_id: str, *, revision: str | None, key: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for hub id ``repo_id`` (named by config key ``key``),
    or a ``UserError`` when it can be neither downloaded nor found in the local cache."""
    at = f" at revision {revision}" if revision else ""
    if offline_mode():
        if cached_snapshot(repo_id, revision) is None:
            raise UserError(
                f"`{repo_id}` ({key}) is not in the local Hugging Face cache{at}, and HF_HUB_OFFLINE is "
                f"set, so it is not downloaded.",
                "Unset HF_HUB_OFFLINE to download it, or: " + _download_hint(repo_id, key),
            )
        return {}
    reason = unreachable_reason(endpoint())
    if reason is None:
        return {}
    if cached_snapshot(repo_id, revision) is not None:
        return {"local_files_only": True}
    raise UserError(
        f"Cannot download `{repo_id}` ({key}): the Hugging Face hub at {endpoint()} cannot be reached "
        f"({reason}), and the model is not in the local cache{at}.",
        "Check the network (and HF_ENDPOINT or the proxy settings). " + _download_hint(repo_id, key),
    )
