"""Ray plumbing shared by the distributed stages: a lazy import with a clear error, and a session helper that
connects to a cluster (or starts a local one) and shuts down only what it started."""

from __future__ import annotations

import contextlib
import logging
import os

from d2r._log import muted

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[ray]'"


class RayMissing(ImportError, ValueError):
    """Ray is not installed (an ImportError; also a ValueError, so the CLI reports it as a one-line error)."""


def import_ray():
    """The ``ray`` module; :class:`RayMissing` (an ImportError) with the install command when the optional
    extra is missing."""
    try:
        import ray
    except ImportError:
        raise RayMissing(f"this needs Ray, an optional extra of d2r: {INSTALL_HINT}") from None
    return ray


def init(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to the Ray cluster at ``address`` ("auto" = the one `ray start` runs on this machine,
    "HOST:PORT" = a head node, "ray://HOST:10001" = Ray Client), or start a local one on this machine
    (``num_cpus``/``num_gpus``: its size; default all) when ``address`` is None or "". Reuses a running
    session. Returns ``(ray, started)``; ``started`` says whether this call initialised Ray.
    Raises ConnectionError (one line, naming the address) when the cluster cannot be reached."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs = {"log_to_driver": log.isEnabledFor(logging.INFO), "configure_logging": False}
    env = {}
    if os.environ.get("PYTHONPATH"):  # a source checkout on the driver: workers import the same d2r
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        if num_cpus is not None or num_gpus is not None:
            raise ValueError("num_cpus/num_gpus size a local Ray; a cluster at an address has its own size")
        _reachable(address)
        try:
            with _quiet_auth_notice():
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    else:
        with _quiet_auth_notice():
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)
    return ray, True


def _quiet_auth_notice():
    """Under --quiet (this module's INFO off), no "Token authentication is enabled..." WARNING line: Ray
    logs it through its own stderr handler when it starts (or joins) a cluster."""
    if log.isEnabledFor(logging.INFO):
        return contextlib.nullcontext()
    return muted("ray._private.authentication")


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None


@contextlib.contextmanager
def session(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """``with session(address) as ray:`` — :func:`init`, then ``ray.shutdown()`` on exit if this call started
    Ray (a session the caller opened stays open)."""
    ray, started = init(address, num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def cluster_cpus(ray) -> int:
    """Number of CPUs the cluster offers (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
