"""Where `engine.ray.address` leads, checked in seconds before `ray.init`, which retries an absent cluster for minutes.

How `ray.init` resolves the address (read in Ray 2.60's `ray._private.worker.init` and `services`): RAY_ADDRESS stands
in for null and `auto`; null and `auto` then look for this node's cluster (the address `ray start` leaves in Ray's temp
folder; `auto` also takes a running raylet's), null starting a new Ray where there is none and `auto` failing; `local`
starts a new one; `ray://HOST:PORT` is Ray Client; anything else is a GCS's HOST:PORT. Given one that nothing serves,
Ray's GCS client retries for minutes (20 tries of up to 40 s), printing C++ warnings each time. Here every address Ray
would dial is looked up, connected to and asked for the one reply a Ray server gives at once, within `TIMEOUT_S` each
step, and a failure is one paragraph naming the address and the fix. Anything inconclusive is left to `ray.init`: a
cluster that works is never refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from collections.abc import Iterator

from annotator.errors import AnnotatorError

TIMEOUT_S = 4.0  # each step: the TCP connect (two lost SYNs still make it), the first bytes, the GCS's reply
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # then an empty SETTINGS
SETTINGS = 0x4  # the HTTP/2 frame type a gRPC server (GCS, Ray Client) sends first
UNIMPLEMENTED = 12  # gRPC status: no such service here (also what an HTTP 404 from a proxy becomes)
START = (
    "Start the cluster first (`ray start --head --port=6379` on one node, `ray start --address=HEAD:6379` on the "
    "others) and set `engine.ray.address` to HEAD:6379, or `auto` when `annotate` runs on a node of it; null starts a "
    "Ray on this machine."
)
PORTS = (
    "A GCS listens on the port `ray start --head` prints (6379 unless `--port` says otherwise); the dashboard's 8265 "
    "and Ray Client's 10001 are other ports."
)
CLIENT = "`ray://` is Ray Client, which the head node serves (on port 10001 by default) while the cluster runs."


def ray_helpers_present() -> bool:
    """Whether this Ray has the internal helpers the check resolves addresses with (read in 2.60; `ray>=2.40` is
    allowed): where it has not, the check is skipped and `ray.init` judges, as before it existed."""
    try:
        from ray._private import services, utils
    except ImportError:
        return False
    needed = [
        (services, "canonicalize_bootstrap_address"),
        (utils, "get_ray_address_file"),
        (utils, "read_ray_address"),
    ]
    return all(callable(getattr(module, name, None)) for module, name in needed)


def check_address(address: str | None) -> None:
    """Raise `AnnotatorError` within seconds if `ray.init(address=address)` would try to join a cluster that is not
    there (nothing resolves, listens, or answers as Ray). Nothing to check where Ray would start a new one."""
    if not ray_helpers_present():
        return
    target, named, fix = address, f"`engine.ray.address` {address!r}", START
    env = os.environ.get("RAY_ADDRESS")
    if env and address in (None, "auto"):
        shown = "null" if address is None else address
        target, named = env, f"RAY_ADDRESS={env!r} (which Ray uses in place of `engine.ray.address: {shown}`)"
        fix = f"{START} Or unset RAY_ADDRESS."
    if target in (None, "auto"):
        target, named, fix = this_nodes_cluster(target)
    if target in (None, "local"):
        return  # a new Ray on this machine
    if "://" not in target:
        check_gcs(target, named, fix)
        return
    scheme, rest = target.split("://", 1)
    if scheme in ("http", "https"):
        raise AnnotatorError(
            f"{named} is an HTTP address (the Ray dashboard's or Jobs API's, for `ray job submit`), not one `annotate` "
            f"can join. {fix}"
        )
    if scheme == "ray" and ":" in rest.rsplit("]", 1)[-1]:  # without a port gRPC picks one: left to Ray
        host, port = host_port(rest, named, fix)
        with reach(host, port, named, f"{CLIENT} {fix}") as sock:
            check_grpc(sock, host, port, named, f"{CLIENT} {fix}")
    if scheme == "ray" and importlib.util.find_spec("grpc") is None:  # what Ray Client needs beyond Ray itself
        raise AnnotatorError(
            f"{named} is a Ray Client address, and Ray Client needs grpcio, which this environment lacks: "
            "`pip install 'ray[client]'` (the same Ray version), or run `annotate` on a node of the cluster with "
            "`engine.ray.address: auto`."
        )
    # Other schemes name a Ray Client builder module of their own (such as `anyscale://`): Ray resolves those.


def this_nodes_cluster(mode: str | None) -> tuple[str | None, str, str]:
    """The address `ray.init` joins for null or `auto` (None: it starts a new Ray), how it found it, and the fix."""
    from ray._private import services, utils

    where = utils.get_ray_address_file(None)
    try:
        found = services.canonicalize_bootstrap_address(mode)
    except ConnectionError:  # `auto`, and nothing found
        raise AnnotatorError(
            "`engine.ray.address: auto` joins the Ray cluster of this node, but none runs here (Ray found neither the "
            f"address `ray start` leaves in {where} nor a running raylet). {START}"
        ) from None
    if found is None:
        return None, "", ""
    if utils.read_ray_address(None):
        named = f"{found!r}, the address `ray start` left in {where} (which Ray joins for `engine.ray.address: "
        named += f"{'null' if mode is None else mode}`)"
        fix = (
            "If that cluster has stopped, start it again (`ray start --head`), or remove that file (`ray stop` on this "
            f"node does) so that null starts a new Ray here. {START}"
        )
        return found, named, fix
    return found, f"{found!r}, the Ray cluster found running on this node", START


def host_port(address: str, named: str, fix: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) split, or a user error naming the form."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # An IPv6 host is written in brackets: `a:b:1` would be read by Ray one way and by a socket another.
    if not host or (":" in host and not bracketed) or not port.isdigit() or not 0 < int(port) < 65536:
        raise AnnotatorError(f"{named} is not an address of the form HOST:PORT (such as 10.0.0.1:6379). {fix}")
    return host, int(port)


def check_gcs(address: str, named: str, fix: str) -> None:
    """A Ray cluster's GCS answers at HOST:PORT: it resolves, accepts a connection, speaks gRPC and serves Ray."""
    from ray._private import services

    host, port = host_port(address, named, fix)
    dialled = services.canonicalize_bootstrap_address(address)  # what Ray dials: localhost becomes this node's IP
    if dialled != f"{host}:{port}":
        named = f"{named} ({dialled} from this node)"
        host, port = host_port(dialled, named, fix)
    with reach(host, port, named, fix) as sock:
        check_grpc(sock, host, port, named, f"{PORTS} {fix}")
    if gcs_status(dialled) == UNIMPLEMENTED:
        raise AnnotatorError(
            f"Something answers at {named}, but it is not a Ray cluster's GCS: {host}:{port} serves no GCS (gRPC "
            f"status UNIMPLEMENTED). {PORTS} {fix}"
        )


@contextlib.contextmanager
def reach(host: str, port: int, named: str, fix: str) -> Iterator[socket.socket]:
    """A TCP connection to HOST:PORT, or a user error saying why there is none: the host does not resolve, nothing
    listens, or no answer within `TIMEOUT_S`."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise AnnotatorError(
            f"{named} names the host {host!r}, which does not resolve here ({exc.strerror or exc}). {fix}"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(TIMEOUT_S)
        try:
            sock.connect(where)
        except ConnectionRefusedError:
            raise AnnotatorError(
                f"Nothing listens at {named}: {host} refused the connection to port {port}. {fix}"
            ) from None
        except TimeoutError:
            raise AnnotatorError(
                f"No answer from {named}: a connection to {host}:{port} did not open within {TIMEOUT_S:g} s (a wrong "
                f"address, a firewall, or the node is down). {fix}"
            ) from None
        except OSError as exc:
            raise AnnotatorError(f"Cannot reach {named} ({host}:{port}): {exc.strerror or exc}. {fix}") from None
        yield sock


def check_grpc(sock: socket.socket, host: str, port: int, named: str, fix: str) -> None:
    """The server at the other end speaks HTTP/2, as Ray's gRPC servers do (over TLS, with RAY_USE_TLS, Ray's own
    client judges): it sends its SETTINGS frame at once."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    first = b""
    with contextlib.suppress(OSError):
        sock.sendall(HTTP2_PREFACE)
        while len(first) < 9:  # an HTTP/2 frame header
            part = sock.recv(64)
            if not part:
                break
            first += part
    if len(first) < 9 or first[3] != SETTINGS:
        said = "sent nothing" if not first else f"answered {first.split(bytes([13, 10]))[0][:40]!r}"
        raise AnnotatorError(
            f"Something answers at {named}, but not as Ray: {host}:{port} {said} where Ray's servers speak gRPC. {fix}"
        )


def gcs_status(address: str) -> int | None:
    """The gRPC status with which Ray's own GCS client fails to connect to `address` within `TIMEOUT_S`; None where
    it connects or the check cannot tell (`ray.init` judges then). The client logs its failure on stderr: kept out of
    the terminal here, since the error says it in one paragraph."""
    import ray._raylet
    from ray.exceptions import RpcError

    inner = getattr(ray._raylet, "InnerGcsClient", None)  # Ray 2.60's standalone client, with a deadline
    if inner is None:
        return None
    with quiet_stderr():
        try:
            inner.standalone(address, None, int(TIMEOUT_S * 1000))
        except RpcError as exc:
            return exc.rpc_code
        except Exception:  # an outcome the check cannot read: `ray.init` will say
            return None
    return None


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile (Ray's C++ logging writes there, past `sys.stderr`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
