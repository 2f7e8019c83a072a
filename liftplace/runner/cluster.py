"""Ray itself: joining a cluster or starting a local one, what the cluster can give, every worker's setup.

``ensure_ray`` joins (``--address``) or starts Ray once per process; ``cluster_capacity`` says
the CPUs and GPUs a run can have (an autoscaling cluster's ceiling: ``autoscaling_ceiling``),
``capacity_now`` and ``node_memory`` what ``liftplace.preflight``'s checks are given once Ray
runs. ``worker_setup`` is Ray's worker_process_setup_hook: every worker process of a liftplace
Ray job runs it at start, so this module imports nothing heavy (Ray loads inside the functions).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path

# Ray Train's controller polls workers every 2 s by default, which caps reporting at one row
# per 2 s; 0.2 s keeps small CPU runs from waiting on it (set before Ray starts).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Written by the cluster launcher (`ray up`) on the head node: the autoscaler's config.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Ray's worker_process_setup_hook: every worker process of this job runs it at start.
WORKER_SETUP = "liftplace.runner.cluster.worker_setup"
CONTROLLER_LOGGER = "ray.train.v2._internal.execution.controller.controller"


def check_reachable(address: str | None) -> None:
    """Refuse, in one line and within seconds, an --address (or RAY_ADDRESS) where nothing
    answers: Ray itself retries a dead address for minutes. "auto" is resolved as Ray resolves
    it; where it finds no cluster, Ray's own error says so."""
    import socket

    if not address:
        return
    target = address
    if "://" not in address:
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address) if address == "auto" else address
        except Exception:  # noqa: BLE001 -- several clusters, or none: ray.init says which
            return
    if not target:
        return
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except ValueError:
        raise ValueError(f"--address {address}: not host:port, auto or ray://host:port") from None
    except OSError as err:
        raise ValueError(f"--address {address}: nothing answers at {target} ({err.strerror or err}); is the cluster "
                         "up? (`ray status` on its head node)") from None


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, show_dashboard: bool = True):
    """Join a cluster (address, e.g. "auto") or start an embedded local Ray, once. A study says
    the dashboard's address in its own header line (show_dashboard=False)."""
    import ray

    if ray.is_initialized():
        return ray
    check_reachable(address or os.environ.get("RAY_ADDRESS"))
    # The job's own settings go to every worker, a joined cluster's too: liftplace's, Ray Train's,
    # and the trackers' (MLflow's store and credentials, W&B's mode and key), which `liftplace
    # distill` uses in Ray Train's controller.
    env = {k: v for k, v in os.environ.items()
           if k == "HF_HUB_OFFLINE" or k.startswith(("LIFTPLACE_", "RAY_TRAIN_", "MLFLOW_", "WANDB_"))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Train V2 routes print() through its logger and the console both: every line twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs = {"runtime_env": {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP},
              "log_to_driver": True}
    # Ray announces the connection on stderr; it is said on stdout instead, so that input refused
    # right after joining (GPUs the cluster lacks) is still one line on stderr.
    announcer = logging.getLogger("ray._private.worker")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    # Ray warns, in a line of log format with a link, that a local Ray has token authentication
    # on (its default, kept here): the fact is said once, in the line below, instead.
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    token_notice = _Swallow("Token authentication is enabled")
    token.addFilter(token_notice)
    # ray.init replaces the SIGTERM handler with its own (sys.exit(15), or a node teardown that
    # exits 1), silently; the caller's own handler (the CLI's: one line and exit 143) is put back
    # once Ray is up. Ray's shutdown at exit still stops the local instance.
    own_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            if address != "auto" and "://" not in address:
                # As for a local instance below: Ray's own actors that look the cluster up with no
                # address must find this one, whatever other Ray runs on the machine.
                kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"] = address
            context = ray.init(address=address, **kwargs)
        else:
            # Some of Ray's own actors (Ray Train's placement-group cleaner) look their cluster
            # up with no address, and fail with "Found multiple active Ray instances" when
            # another Ray runs on the machine. The GCS port is chosen here, so that every
            # worker of this cluster can be told its address (RAY_ADDRESS) from the start.
            from ray._private.services import get_node_ip_address

            port = _free_port()
            kwargs["runtime_env"]["env_vars"]["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
            # Nothing preempts a local machine; Ray Train's preemption watcher only logs a
            # core_worker error line ("... constructor arguments in the object store ...") per run.
            kwargs["runtime_env"]["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            previous = os.environ.get("RAY_GCS_SERVER_PORT")
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            try:
                # The dashboard stays on localhost (Ray's default); reach it over an SSH tunnel.
                context = ray.init(num_cpus=num_cpus, object_store_memory=256 * 2**20, **kwargs)
            finally:
                if previous is None:
                    os.environ.pop("RAY_GCS_SERVER_PORT", None)
                else:
                    os.environ["RAY_GCS_SERVER_PORT"] = previous
    except SystemExit as stop:
        if stop.code == signal.SIGTERM and callable(own_term):  # Ray's handler, during ray.init
            own_term(signal.SIGTERM, None)
        raise
    finally:
        announcer.setLevel(level)
        token.removeFilter(token_notice)
        if callable(own_term):
            signal.signal(signal.SIGTERM, own_term)
    RAY_SESSION["dashboard"] = f"http://{context.dashboard_url}" if context.dashboard_url else None
    auth = " (token authentication on)" if token_notice.seen else ""
    dashboard = f"; dashboard {RAY_SESSION['dashboard']}" if RAY_SESSION["dashboard"] and show_dashboard else ""
    print(f"ray: {f'joined the cluster at {address}' if address else 'started a local instance'}{auth}{dashboard}")
    return ray


def _free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


RAY_SESSION: dict = {"dashboard": None}  # what ensure_ray learnt, for a study's header line


class _Swallow(logging.Filter):
    """Drops the log records that start with ``prefix`` (a string or a tuple), remembering that
    one came."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.prefix):
            self.seen = True
            return False
        return True


def cluster_capacity() -> dict:
    """The CPUs and GPUs the joined Ray cluster has now or, autoscaling, can reach at most
    (``autoscaling_ceiling``: GPU workers of a `ray up` cluster start from zero)."""
    import ray

    return autoscaling_ceiling({key: ray.cluster_resources().get(key, 0) for key in ("CPU", "GPU")})


def capacity_now() -> dict | None:
    """``cluster_capacity`` of the Ray this process runs on; None while none runs (what
    ``preflight.check_resources`` takes)."""
    import ray

    return cluster_capacity() if ray.is_initialized() else None


def node_memory() -> float | None:
    """The Ray "memory" resource of the running cluster's largest live node (0: none says);
    None while no Ray runs in this process (what ``preflight.check_memory`` takes)."""
    import ray

    if not ray.is_initialized():
        return None
    return max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def autoscaling_ceiling(have: dict, bootstrap: str | Path | None = None) -> dict:
    """What an autoscaling cluster can grow to, from what it has now (``have``: CPU, GPU).

    On the head node of a `ray up` cluster (cluster.yaml scales GPU workers from zero) the
    autoscaler may add up to ``max_workers`` nodes of each worker type, with the ``resources``
    the type declares (an upper bound: nodes already up count twice); a type that declares
    none makes the ceiling unknown (infinite). Without the launcher's file: ``have``.
    """
    path = Path(bootstrap or BOOTSTRAP_CONFIG).expanduser()
    have = dict(have)
    if not path.is_file():
        return have
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = node_type.get("max_workers", 0)
        if name == config.get("head_node_type") or not count:
            continue
        declared = node_type.get("resources") or {}
        for key in have:
            have[key] += count * declared.get(key, 0) if declared else math.inf
    return have


class _FileSystemErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, OSError) and record.getMessage().startswith("Error in control loop iteration"))


def worker_setup() -> None:
    """What every worker process of a liftplace Ray job sets up at start (``WORKER_SETUP``).

    Ray Train's controller logs, with a full traceback, an error raised while it writes the
    run's own state to storage (a full disk under --out, say) before the run fails with that
    error. The driver says that failure in one line (its cause and the resume command) and
    writes the error in full to the run's error.txt where it can, so the controller's copy on
    the console is dropped: only for file system errors (OSError); any other error of the
    controller keeps its traceback."""
    logger = logging.getLogger(CONTROLLER_LOGGER)
    if not any(isinstance(f, _FileSystemErrors) for f in logger.filters):
        logger.addFilter(_FileSystemErrors())
