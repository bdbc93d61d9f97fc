"""[settings.cluster] and what is checked before connecting to a Ray cluster (no cluster runs)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from localmoa.backends import make_backends
from localmoa.cluster.checks import check_cluster, check_cluster_settings, token_problem
from localmoa.cluster.settings import ClusterSettings, split_address
from localmoa.config import Settings
from localmoa.errors import (
    ConfigError,
    EgressError,
    MissingExtraError,
    ServerUnavailableError,
    UsageRefused,
)

OFF = "10.0.0.5:6379"
TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret"}


def ray_settings(address: str | None = OFF, allowed: tuple[str, ...] = ("10.0.0.5",)) -> Settings:
    return Settings(
        cluster=ClusterSettings(engine="ray", address=address), allowed_hosts=list(allowed)
    )


@pytest.fixture
def no_ray_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Ray authentication in the environment, and a home with no token file."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_the_local_engine_needs_nothing() -> None:
    check_cluster(Settings())
    check_cluster(Settings(cluster=ClusterSettings(engine="local", address="10.9.9.9:1")))


def test_ray_without_an_address_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r'^settings\.cluster\.address: engine = "ray" needs'):
        check_cluster(ray_settings(address=None))


def test_an_address_off_this_machine_must_be_allowed(no_ray_auth: Path) -> None:
    with pytest.raises(
        EgressError,
        match=r'^settings\.cluster\.address: "10\.0\.0\.5" is not on this machine.*'
        r'allowed_hosts = \["10\.0\.0\.5"\]',
    ):
        check_cluster(ray_settings(allowed=()))


def test_a_loopback_address_needs_neither_allowing_nor_a_token(no_ray_auth: Path) -> None:
    check_cluster(ray_settings("127.0.0.1:6379", allowed=()))
    check_cluster(ray_settings("[::1]:6379", allowed=()))


def test_an_allowed_address_off_this_machine_needs_token_authentication(
    no_ray_auth: Path,
) -> None:
    with pytest.raises(UsageRefused) as refused:
        check_cluster(ray_settings())
    message = str(refused.value)
    assert message.startswith(f"settings.cluster.address: {OFF} is off this machine")
    assert "set RAY_AUTH_MODE=token (it is unset)" in message
    assert "token-auth.html" in message and "\n" not in message


def test_token_mode_without_a_token_says_where_to_put_one(
    no_ray_auth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(UsageRefused, match=r"no token: set RAY_AUTH_TOKEN.*\.ray/auth_token"):
        check_cluster(ray_settings())
    missing = no_ray_auth / "absent"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(missing))
    with pytest.raises(UsageRefused, match=f"RAY_AUTH_TOKEN_PATH names {missing}, which is"):
        check_cluster(ray_settings())


@pytest.mark.parametrize("where", ["variable", "file named", "default file"])
def test_a_token_ray_will_find_satisfies_the_check(
    where: str, no_ray_auth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    if where == "variable":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    elif where == "file named":
        named = no_ray_auth / "token.txt"
        named.write_text("s3cret\n")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    else:
        (no_ray_auth / ".ray").mkdir()
        (no_ray_auth / ".ray" / "auth_token").write_text("s3cret")
    check_cluster(ray_settings())


def test_token_problem_reads_the_mapping_given() -> None:
    assert token_problem(TOKEN) is None
    assert token_problem({"RAY_AUTH_MODE": "disabled"}) == (
        "set RAY_AUTH_MODE=token (it is 'disabled') and the cluster's token in RAY_AUTH_TOKEN"
    )
    cluster = ClusterSettings(engine="ray", address=OFF)
    check_cluster_settings(cluster, ["10.0.0.5"], environ=TOKEN)


def test_ray_not_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(
        MissingExtraError, match=r"needs Ray, which is not installed.*pip install 'localmoa\[ray\]'"
    ):
        check_cluster(ray_settings("127.0.0.1:6379"))


def test_the_registry_checks_the_cluster_before_making_the_llamacpp_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(EgressError, match=r"^settings\.cluster\.address"):
        make_backends(ray_settings(allowed=()))["llamacpp"]
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"localmoa\[ray\]"):
        make_backends(ray_settings("127.0.0.1:6379"))["llamacpp"]


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.0.0.5", 'is not "HOST:PORT"'),
        ("10.0.0.5:0", 'is not "HOST:PORT"'),
        ("10.0.0.5:99999", 'is not "HOST:PORT"'),
        ("ray://10.0.0.5:10001", "is a Ray Client address"),
    ],
)
def test_a_malformed_address_says_how_to_write_it(address: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        ClusterSettings(engine="ray", address=address)


def test_addresses_split_into_host_and_port() -> None:
    assert split_address("head.lan:6379") == ("head.lan", 6379)
    assert split_address("[fd00::5]:6380") == ("fd00::5", 6380)


def test_models_dir_must_be_absolute_on_the_node() -> None:
    ClusterSettings(models_dir={"box-b": "/srv/models"})
    with pytest.raises(ValidationError, match=r'"models" \(node box-b\) is not an absolute path'):
        ClusterSettings(models_dir={"box-b": "models"})


def test_joining_an_address_where_nothing_listens_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._private import ray_constants

    from localmoa.cluster.ray_engine import connect

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # loopback stays loopback
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(
        ServerUnavailableError,
        match=rf"^settings\.cluster\.address: nothing answers at 127\.0\.0\.1:{port} .*"
        rf"ray start --head --port={port}",
    ):
        connect(ray_settings(f"127.0.0.1:{port}"))
