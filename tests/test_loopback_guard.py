"""The loopback guard of conftest.py: test code cannot reach a non-loopback address.

Every check replaces the real ``socket.connect`` behind the guard with a recorder, so a
broken guard would be seen by the recorder, never by the network."""

from __future__ import annotations

import socket

import aiohttp
import pytest

import conftest
from conftest import GUARDS, NonLoopbackConnection, is_loopback_destination


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> list:
    """The destinations that got past the guard; nothing is really connected."""
    seen: list = []

    def record(sock, address):
        seen.append(address)
        raise ConnectionRefusedError("recorded, not connected")

    monkeypatch.setitem(conftest._REAL, "connect", record)
    monkeypatch.setitem(conftest._REAL, "connect_ex", lambda sock, address: seen.append(address) or 111)
    monkeypatch.setitem(conftest._REAL, "sendto", lambda sock, data, *args: seen.append(args[-1]) or len(data))
    return seen


def test_the_guard_is_installed_for_the_session() -> None:
    for name, guard in GUARDS.items():
        assert getattr(socket.socket, name) is guard, name


@pytest.mark.parametrize(
    "family,address",
    [
        (socket.AF_INET, ("192.0.2.1", 80)),
        (socket.AF_INET, ("10.0.0.1", 3003)),
        (socket.AF_INET, ("0.0.0.0", 3003)),
        (socket.AF_INET, ("example.invalid", 80)),
        (socket.AF_INET, ("", 80)),
        (socket.AF_INET6, ("2001:db8::1", 80, 0, 0)),
        (socket.AF_INET6, ("::ffff:192.0.2.1", 80, 0, 0)),
        (socket.AF_INET6, ("fe80::1%lo", 80, 0, 0)),
    ],
)
def test_non_loopback_destinations_are_refused(recorder: list, family: int, address) -> None:
    assert not is_loopback_destination(family, address)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(NonLoopbackConnection, match="loopback only"):
            sock.connect(address)
        with pytest.raises(NonLoopbackConnection):
            sock.connect_ex(address)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        with pytest.raises(NonLoopbackConnection):
            sock.sendto(b"x", address)
        with pytest.raises(NonLoopbackConnection):
            sock.sendto(b"x", 0, address)
    assert recorder == []


@pytest.mark.parametrize(
    "family,address",
    [
        (socket.AF_INET, ("127.0.0.1", 3003)),
        (socket.AF_INET, ("127.8.9.10", 3003)),
        (socket.AF_INET, ("localhost", 3003)),
        (socket.AF_INET6, ("::1", 3003, 0, 0)),
        (socket.AF_INET6, ("::ffff:127.0.0.1", 3003, 0, 0)),
    ],
)
def test_loopback_destinations_pass(recorder: list, family: int, address) -> None:
    assert is_loopback_destination(family, address)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(ConnectionRefusedError, match="recorded"):
            sock.connect(address)
    assert recorder == [address]


def test_unix_sockets_pass(recorder: list, tmp_path) -> None:
    assert is_loopback_destination(socket.AF_UNIX, str(tmp_path / "s"))


async def test_an_http_client_cannot_reach_another_host(recorder: list) -> None:
    """aiohttp connects through the same sockets: refused before any packet."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get("http://192.0.2.1:9/ping", timeout=aiohttp.ClientTimeout(total=5))
    assert recorder == []


def test_urllib_cannot_reach_another_host(recorder: list) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen("http://192.0.2.1:9/ping", timeout=5)
    assert isinstance(refused.value.reason, NonLoopbackConnection)
    assert recorder == []
