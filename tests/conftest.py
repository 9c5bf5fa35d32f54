"""Shared fixtures: real mosquitto, moto server, gateway subprocess, publisher, fault proxies.

Scopes, and why: one moto server per session (Flask + moto import takes ~1 s; each test gets its
own uniquely named stream, so tests never see each other's records); one mosquitto per test (starts
in ~20 ms, and a fresh broker means no persistent sessions or queued messages leak between tests);
one ejabberd per session (it takes 2-3 s to start, so each test that uses it brings its own client
ids and topic root instead); one aedes per test (~0.3 s).
Every process is stopped by its pid in the fixture's teardown, also when the test fails; the
files (configs, logs) stay in the test's tmp_path for inspection.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # plain `pytest` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if TYPE_CHECKING:  # the live support needs moto, cryptography and psutil: imported only by live fixtures
    from tests.support.brokers import Aedes, BrokerUnderTest, Ejabberd
    from tests.support.certs import Pki
    from tests.support.faultproxy import FaultProxy
    from tests.support.gatewayproc import GatewayProcess
    from tests.support.publisher import Publisher
    from tests.support.services import Mosquitto, MotoServer
    from tests.support.tcpproxy import TcpProxy


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration and tests/fault carries its marker, whatever its module says.

    `long` tests run only when the -m expression names `long`: pyproject's addopts says
    `-m "not long"`, but a command line's own -m (`-m fault`) replaces it, and must not pull in
    a 10-minute variant by accident."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for folder in ("integration", "fault"):
            if folder in parts and item.get_closest_marker(folder) is None:
                item.add_marker(getattr(pytest.mark, folder))
    if "long" not in (config.getoption("markexpr", "") or ""):
        keep = [i for i in items if i.get_closest_marker("long") is None]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("long")])
            items[:] = keep


@pytest.fixture(scope="session")
def kinesis_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's moto server (`.url`, `.client()`, `.reset()`)."""
    from tests.support.services import MotoServer

    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def kinesis(kinesis_endpoint: MotoServer) -> Any:
    """A boto3 Kinesis client on the moto server (fake credentials, us-east-1)."""
    from tests.support.services import kinesis_client

    return kinesis_client(kinesis_endpoint.url)


@pytest.fixture
def make_stream(kinesis: Any, request: pytest.FixtureRequest) -> Callable[..., str]:
    """make_stream(shards=1, suffix="") -> a new ACTIVE stream named after the test."""
    from tests.support.services import create_stream

    base = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60]

    def make(shards: int = 1, suffix: str = "") -> str:
        name = f"{base}{suffix}-{uuid.uuid4().hex[:8]}"
        create_stream(kinesis, name, shards)
        return name

    return make


@pytest.fixture
def kinesis_stream(make_stream: Callable[..., str]) -> str:
    """Name of a fresh one-shard stream for this test."""
    return make_stream()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """mosquitto_factory(**Mosquitto kwargs) -> a started broker, stopped after the test."""
    from tests.support.services import Mosquitto

    brokers: list[Mosquitto] = []

    def make(**kw: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto{len(brokers)}", **kw)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A started default broker: anonymous, no persistence, max_queued_messages 1000000."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def ejabberd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    """The session's ejabberd (MQTT 5 and 3.1.1 on one port; any username and password logs in)."""
    from tests.support.brokers import Ejabberd

    broker = Ejabberd(tmp_path_factory.mktemp("ejabberd"))
    try:
        yield broker.start()
    finally:
        broker.close()


@pytest.fixture
def aedes(tmp_path: Path) -> Iterator[Aedes]:
    """A started aedes (MQTT 3.1.1 only, in-memory sessions), stopped after the test."""
    from tests.support.brokers import Aedes

    broker = Aedes(tmp_path / "aedes")
    try:
        yield broker.start()
    finally:
        broker.close()


BROKERS = ("mosquitto", "ejabberd-5", "ejabberd-3.1.1", "aedes")


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> BrokerUnderTest:
    """Each broker implementation the delivery suites run against (docs/brokers.md#compatibility).

    Mosquitto here persists to disk, so a restart keeps its sessions; ejabberd (shared by the
    session: use a topic root and client ids of the test's own) and aedes keep theirs in RAM."""
    from tests.support.brokers import BrokerUnderTest

    name = str(request.param)
    if name == "mosquitto":
        server = request.getfixturevalue("mosquitto_factory")(persistence=True)
        return BrokerUnderTest(name, server, "5", keeps_sessions_across_restart=True)
    if name.startswith("ejabberd"):
        server = request.getfixturevalue("ejabberd")
        return BrokerUnderTest(name, server, name.removeprefix("ejabberd-"), keeps_sessions_across_restart=False,
                               window_of_one=True, username=server.username, password=server.password)
    return BrokerUnderTest(name, request.getfixturevalue("aedes"), "3.1.1", keeps_sessions_across_restart=False)


@pytest.fixture
def fault_proxy(kinesis_endpoint: MotoServer) -> Iterator[FaultProxy]:
    """An HTTP fault proxy in front of the moto server; aim the gateway at `fault_proxy.url`."""
    from tests.support.faultproxy import FaultProxy

    with FaultProxy(kinesis_endpoint.url) as proxy:
        yield proxy


@pytest.fixture
def tcp_proxy(mosquitto: Mosquitto) -> Iterator[TcpProxy]:
    """A TCP proxy to the default broker; aim the gateway at `tcp_proxy.port`."""
    from tests.support.tcpproxy import TcpProxy

    with TcpProxy(mosquitto.port) as proxy:
        yield proxy


@pytest.fixture
def gateway_process(tmp_path: Path, request: pytest.FixtureRequest
                    ) -> Iterator[Callable[..., GatewayProcess]]:
    """gateway_process(routes=None, *, start=True, ready=True, **GatewayProcess kwargs).

    MQTT defaults to the `mosquitto` fixture and Kinesis to `kinesis_endpoint` unless mqtt_port /
    kinesis_url are given. Killed (SIGKILL) at teardown if still running after the test."""
    from tests.support.gatewayproc import GatewayProcess

    procs: list[GatewayProcess] = []

    def make(routes: str | Path | None = None, *, start: bool = True, ready: bool = True,
             **kw: Any) -> GatewayProcess:
        if kw.get("base_env", True):
            if "mqtt_port" not in kw:
                kw["mqtt_port"] = request.getfixturevalue("mosquitto").port
            if "kinesis_url" not in kw:
                kw["kinesis_url"] = request.getfixturevalue("kinesis_endpoint").url
        proc = GatewayProcess(tmp_path / f"gateway{len(procs)}", routes=routes, **kw)
        procs.append(proc)
        if start:
            proc.start()
            if ready:
                proc.wait_ready()
        return proc

    yield make
    for proc in procs:
        proc.kill()


@pytest.fixture
def publisher(request: pytest.FixtureRequest) -> Iterator[Callable[..., Publisher]]:
    """publisher(port=None, **Publisher kwargs) -> a connected Publisher (default: `mosquitto`)."""
    from tests.support.publisher import Publisher

    pubs: list[Publisher] = []

    def make(port: int | None = None, **kw: Any) -> Publisher:
        pub = Publisher(port=port or request.getfixturevalue("mosquitto").port, **kw)
        pubs.append(pub)
        return pub.connect()

    yield make
    for pub in pubs:
        pub.close()


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server, expired server, unrelated CA and client certificates (see certs.Pki)."""
    from tests.support.certs import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"))
