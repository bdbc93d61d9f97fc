"""What is checked before localmoa connects to a Ray cluster, and why.

Ray runs whatever code reaches its ports: "anybody who can access the associated ports can
execute arbitrary code" (docs.ray.io, ray-security). Connecting to a cluster therefore hands the
cluster this process's trust, and the cluster hands its own to anyone on the network unless it
authenticates. So before any socket opens, :func:`check_cluster` holds four things:

1. ``engine = "ray"`` has an ``address``;
2. the address's host is loopback or listed in ``settings.allowed_hosts`` (the egress promise
   every network backend keeps, :mod:`localmoa.egress`);
3. Ray is installed, at least :data:`MIN_RAY` (the first with token authentication), else the
   ``pip install`` line of the ``ray`` extra;
4. a host off this machine is reached with Ray's token authentication: ``RAY_AUTH_MODE=token``
   in this process's environment and a token Ray will find, in its own order of precedence
   (docs.ray.io, "Token Authentication"): ``RAY_AUTH_TOKEN``, else the file named by
   ``RAY_AUTH_TOKEN_PATH`` (which Ray refuses to start without when set), else
   ``~/.ray/auth_token``. Ray reads only ``RAY_AUTH_MODE`` from the environment to decide, and
   an explicit address never turns authentication on by itself, so both are checked here.

What cannot be checked from this side before connecting is whether the cluster itself enforces
the token; the inventory (:mod:`localmoa.cluster.ray_engine`) asks every node once connected,
and a node that does not is refused there. Token authentication authenticates; it does not
encrypt: Ray's traffic is TLS only when the cluster is set up with ``RAY_USE_TLS`` (README:
several machines).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from localmoa.cluster.settings import ClusterSettings, split_address
from localmoa.egress import check_url, is_loopback
from localmoa.errors import ConfigError, MissingExtraError, UsageRefused

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = [
    "INSTALL_LINE",
    "MIN_RAY",
    "TOKEN_AUTH_DOCS",
    "check_cluster",
    "check_cluster_settings",
    "require_ray",
    "token_problem",
]

MIN_RAY = (2, 52)
"""Ray 2.52.0 introduced token authentication (docs.ray.io, "Ray token authentication")."""

INSTALL_LINE = "pip install 'localmoa[ray]'"

TOKEN_AUTH_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"

DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"
"""Where Ray looks for its token when neither variable names one, under the home folder."""


def check_cluster(settings: Settings) -> None:
    """Refuse, as one line naming the key and what to do (exit 2), a ``[settings.cluster]``
    that localmoa must not or cannot connect to; nothing for the local engine. Opens nothing."""
    check_cluster_settings(settings.cluster, settings.allowed_hosts)


def check_cluster_settings(
    cluster: ClusterSettings,
    allowed_hosts: list[str],
    environ: Mapping[str, str] | None = None,
) -> None:
    """:func:`check_cluster` on its parts; ``environ`` defaults to this process's."""
    if cluster.engine != "ray":
        return
    if cluster.address is None:
        raise ConfigError(
            'settings.cluster.address: engine = "ray" needs the Ray head node\'s address; '
            'add address = "HOST:PORT" (what `ray start --head` prints, e.g. "10.0.0.5:6379")'
        )
    host, port = split_address(cluster.address)
    shown = f"[{host}]" if ":" in host else host
    check_url(
        f"tcp://{shown}:{port}", allowed_hosts=allowed_hosts, setting="settings.cluster.address"
    )
    require_ray()
    if is_loopback(host):
        return  # reachable only from this machine: Ray's ports are not the network's
    problem = token_problem(os.environ if environ is None else environ)
    if problem:
        raise UsageRefused(
            f"settings.cluster.address: {cluster.address} is off this machine, and a Ray "
            f"cluster without token authentication runs any code sent to it; {problem}, here "
            f"and on every node before `ray start` (see {TOKEN_AUTH_DOCS})"
        )


def require_ray() -> str:
    """Ray's version; MissingExtraError naming the extra when Ray is missing, broken or older
    than :data:`MIN_RAY`."""
    what = 'settings.cluster.engine = "ray" needs Ray'
    try:
        ray = importlib.import_module("ray")
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise _broken(what, exc) from None
        raise MissingExtraError(
            f"{what}, which is not installed; install it with: {INSTALL_LINE}"
        ) from None
    except (ImportError, OSError, RuntimeError) as exc:  # a wheel that will not load
        raise _broken(what, exc) from None
    version = str(getattr(ray, "__version__", "0"))
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if found < MIN_RAY:
        least = ".".join(map(str, MIN_RAY))
        raise MissingExtraError(
            f"{what} {least} or later (token authentication), and {version} is installed; "
            f"upgrade it with: {INSTALL_LINE} --upgrade"
        )
    return version


def _broken(what: str, exc: BaseException) -> MissingExtraError:
    return MissingExtraError(
        f"{what}, which is installed but cannot be imported ({exc}); reinstall it with: "
        f"{INSTALL_LINE} --force-reinstall"
    )


def token_problem(environ: Mapping[str, str], home: Path | None = None) -> str | None:
    """What is missing for Ray to authenticate this process with a token, as the thing to
    set; None when ``RAY_AUTH_MODE=token`` and Ray will find a token (see the module
    docstring for Ray's order). ``home`` defaults to ``environ``'s HOME, else this user's."""
    mode = environ.get("RAY_AUTH_MODE", "")
    if mode.lower() != "token":
        now = f"it is {mode!r}" if mode else "it is unset"
        return f"set RAY_AUTH_MODE=token ({now}) and the cluster's token in RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN", ""):
        return None
    named = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if named and not _has_text(Path(named)):  # Ray refuses to start then; so do we
        return (
            f"RAY_AUTH_TOKEN_PATH names {named}, which is missing, unreadable or empty; "
            "put the cluster's token there (`ray get-auth-token` prints it on the head)"
        )
    if named:
        return None
    if home is None:
        home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    default = home / DEFAULT_TOKEN_FILE
    if _has_text(default):
        return None
    return (
        "RAY_AUTH_MODE=token, but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a "
        f"file holding it, or put it in {default}"
    )


def _has_text(path: Path) -> bool:
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False
