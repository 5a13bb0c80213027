"""An `engine.ray.address` (or RAY_ADDRESS) that leads to no Ray cluster: `run` and `plan` stop within seconds with one
paragraph naming the address and the fix, exit 1, nothing written, and none of Ray's minutes of retries and warnings."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from annotator.errors import AnnotatorError
from annotator.ray_address import check_address
from tests.conftest import scaleout_recipe
from tests.test_scaleout import invoke

ray = pytest.importorskip("ray")
FOREIGN = ("rpc_client", "gcs_client", "Failed to connect", "Traceback")  # Ray's C++ warnings, Python's tracebacks
START_FIRST = "Start the cluster first (`ray start --head"
BOUND_S = 10  # a generous bound on "within seconds": each check's steps wait at most 4 s


@pytest.fixture(autouse=True)
def no_ray_on_this_node(tmp_path, monkeypatch):
    """Ray as on a node where none runs: not in this process, no `ray start` address file (Ray's temp folder in
    tmp_path), no raylet found (other sessions' test clusters on this machine are not this node's cluster)."""
    assert not ray.is_initialized(), "a Ray in this process is used as it is, whatever the address"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", no_raylet)


def no_raylet() -> frozenset[str]:
    return frozenset()


no_raylet.cache_clear = lambda: None  # as Ray's own: `ray.init` clears it


def serve(reply: bytes | Callable[[socket.socket], None] | None, backlog: int = 8) -> Iterator[str]:
    """A TCP server on this node's every address: answers each connection with `reply` (bytes, or a function that
    talks) and closes it, or (None) holds it open without a word; `backlog=0` and no accepting: a full queue, which
    lets a new connection never open."""
    server = socket.create_server(("", 0), backlog=backlog)
    port = server.getsockname()[1]
    held: list[socket.socket] = []

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if reply is None:
                held.append(conn)
            elif callable(reply):
                threading.Thread(target=talk, args=(conn, reply), daemon=True).start()
            else:
                with conn:
                    conn.sendall(reply)

    if backlog:
        threading.Thread(target=answer, daemon=True).start()
    else:  # fill the accept queue: the next connection's SYN is dropped
        held.append(socket.create_connection(("127.0.0.1", port), timeout=BOUND_S))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def not_found_over_http2(conn: socket.socket) -> None:
    """An HTTP/2 server that answers every request 404 (as a proxy in front of nothing; a gRPC server without the
    GCS's service answers UNIMPLEMENTED, which is what Ray's client makes of a 404). A frame: 3 bytes of length, type,
    flags, 4 of stream, then the payload."""
    conn.sendall(bytes.fromhex("000000040000000000"))  # SETTINGS
    frames = conn.makefile("rb")
    frames.read(24)  # the client's preface
    while len(header := frames.read(9)) == 9:
        kind, flags, stream = header[3], header[4], header[5:9]
        frames.read(int.from_bytes(header[:3], "big"))
        if kind == 0x4 and not flags & 0x1:  # SETTINGS: acknowledged
            conn.sendall(bytes.fromhex("000000040100000000"))
        elif kind == 0x1:  # a request's HEADERS: `:status 404` (HPACK static entry 13), END_STREAM | END_HEADERS
            conn.sendall(bytes.fromhex("0000010105") + stream + bytes([0x8D]))


def talk(conn: socket.socket, how: Callable[[socket.socket], None]) -> None:
    with conn, contextlib.suppress(OSError):
        how(conn)


@pytest.fixture
def http2_not_found() -> Iterator[str]:
    yield from serve(not_found_over_http2)


@pytest.fixture
def dashboard_like() -> Iterator[str]:
    yield from serve(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def silent() -> Iterator[str]:
    yield from serve(None)


@pytest.fixture
def dropping() -> Iterator[str]:
    yield from serve(None, backlog=0)


def fails_fast(
    tmp_path, scaleout_input, capfd, command: str, address: str | None, *expected: str, fix: str = START_FIRST
) -> str:
    """`annotate COMMAND` with `engine.ray.address`: exit 1 within seconds, one paragraph holding `expected` and the
    fix, no traceback, none of Ray's own log lines, and no output folder. Returns the message."""
    recipe = scaleout_recipe(tmp_path, scaleout_input, "out")
    setting = f"engine.ray.address={address}" if address is not None else "engine.ray.address=null"
    start = time.monotonic()
    result = invoke(command, recipe, "--set", "engine.kind=ray", "--set", setting)
    elapsed = time.monotonic() - start
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert elapsed < BOUND_S, f"{elapsed:.1f} s"
    for text in expected:
        assert text in message, message
    assert fix in message, message
    foreign = capfd.readouterr().err
    assert not any(line in message or line in foreign for line in FOREIGN), foreign
    assert not (tmp_path / "out").exists()
    return message


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:1", ["'127.0.0.1:1'", "refused the connection to port 1"]),
        ("ray://127.0.0.1:1", ["'ray://127.0.0.1:1'", "refused", "Ray Client"]),
        ("http://127.0.0.1:8265", ["'http://127.0.0.1:8265'", "HTTP address"]),
        ("auto", ["`engine.ray.address: auto`", "none runs here"]),
        ("head:port", ["'head:port'", "HOST:PORT"]),
        ("127.0.0.1:6379:1", ["'127.0.0.1:6379:1'", "HOST:PORT"]),  # Ray's own parser raised ValueError
        ("::1:6379", ["'::1:6379'", "HOST:PORT"]),  # IPv6 in brackets: [::1]:6379
    ],
)
def test_a_cluster_that_is_not_there_is_a_user_error_within_seconds(tmp_path, scaleout_input, capfd, address, expected):
    fails_fast(tmp_path, scaleout_input, capfd, "run", address, *expected)


def test_a_host_that_does_not_resolve(tmp_path, scaleout_input, capfd, monkeypatch):
    real = socket.getaddrinfo

    def lookup(host, *args, **kwargs):  # as a resolver answers for it, without asking one (tests have no network)
        if host == "head.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    fails_fast(tmp_path, scaleout_input, capfd, "run", "head.invalid:6379", "'head.invalid'", "does not resolve")


def test_a_server_that_is_not_ray_such_as_the_dashboard(tmp_path, scaleout_input, capfd, dashboard_like):
    message = fails_fast(tmp_path, scaleout_input, capfd, "run", dashboard_like, dashboard_like, "HTTP/1.1 400")
    assert "8265" in message and "6379" in message, "which port is the GCS's"


def test_a_server_that_speaks_http2_but_serves_no_ray(tmp_path, scaleout_input, capfd, http2_not_found):
    """What a proxy in front of nothing says (some networks answer every address so), or a gRPC server that is not
    the GCS: Ray's own client asked once, with a deadline; its warning kept out of the terminal."""
    fails_fast(tmp_path, scaleout_input, capfd, "run", http2_not_found, http2_not_found, "not a Ray cluster's GCS")


def test_ray_client_without_its_package_says_which(tmp_path, scaleout_input, capfd, http2_not_found, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    client = f"ray://{http2_not_found}"
    fix = "`pip install 'ray[client]'` (the same Ray version), or run `annotate` on a node of the cluster"
    fails_fast(tmp_path, scaleout_input, capfd, "plan", client, client, "needs grpcio", fix=fix)


@pytest.mark.slow
def test_a_server_that_never_answers(tmp_path, scaleout_input, capfd, silent):
    fails_fast(tmp_path, scaleout_input, capfd, "run", silent, silent, "sent nothing")


@pytest.mark.slow
def test_a_connection_that_never_opens_as_behind_a_firewall(tmp_path, scaleout_input, capfd, dropping):
    fails_fast(tmp_path, scaleout_input, capfd, "run", dropping, dropping, "did not open within 4 s")


def test_ray_address_pointing_nowhere_stands_in_for_null_and_auto(tmp_path, scaleout_input, capfd, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    for address in (None, "auto"):
        message = fails_fast(tmp_path, scaleout_input, capfd, "run", address, "RAY_ADDRESS='127.0.0.1:1'", "refused")
        assert "unset RAY_ADDRESS" in message


def test_a_stale_ray_start_address_is_named_with_its_file(tmp_path, scaleout_input, capfd):
    """A `ray start` cluster that died without `ray stop` leaves its address file: Ray joins that even for null."""
    written = tmp_path / "ray-tmp" / "ray" / "ray_current_cluster"
    written.parent.mkdir(parents=True)
    written.write_text("127.0.0.1:1")
    message = fails_fast(tmp_path, scaleout_input, capfd, "run", None, str(written), "refused")
    assert "`ray stop`" in message


def test_ray_client_without_a_port_or_its_package_is_refused_by_plan_as_by_run(
    tmp_path, scaleout_input, capfd, monkeypatch
):
    """`ray://` without a port: `plan` passed it and `run` then failed in `ray.init` for want of grpcio."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    fix = "`pip install 'ray[client]'` (the same Ray version), or run `annotate` on a node of the cluster"
    fails_fast(tmp_path, scaleout_input, capfd, "plan", "ray://head", "'ray://head'", "needs grpcio", fix=fix)


@pytest.mark.parametrize("address", ["127.0.0.1:1", "auto"])
def test_plan_says_so_too_without_joining(tmp_path, scaleout_input, capfd, address):
    fails_fast(tmp_path, scaleout_input, capfd, "plan", address, address)


def test_where_ray_would_start_its_own_there_is_nothing_to_check(monkeypatch):
    check_address(None)  # no RAY_ADDRESS, no address file: `ray.init` starts a new Ray
    check_address("local")
    check_address("anyscale://cluster")  # a Ray Client builder module of its own: Ray resolves it
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    check_address("local")  # RAY_ADDRESS stands in for null and `auto` only
    with pytest.raises(AnnotatorError, match="RAY_ADDRESS"):
        check_address(None)


def test_a_ray_without_the_helpers_the_check_reads_is_left_to_ray_init(monkeypatch):
    """Ray's internal helpers may move in another version (`ray>=2.40`): then nothing is checked, nothing raises."""
    monkeypatch.delattr(ray._private.services, "canonicalize_bootstrap_address")
    check_address("127.0.0.1:1")  # would be refused with the helpers
