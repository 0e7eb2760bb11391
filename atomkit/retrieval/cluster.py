"""Indexing on a Ray cluster: each actor holds one resident ``Session``, videos go to whichever actor is free.

ATOM keeps its modules resident per device; on a cluster the unit is the actor. ``RayCaptioner`` starts
``actors`` actors, each loading the encoder, decoder and embedder once, and hands them one video at a time.
``atomkit.retrieval.indexing.update`` stores each result in the library as it arrives, so the store is written by the
driver alone (SQLite has one writer) and a run that is stopped keeps every video already stored. A video whose
actor dies is given to another actor (the dead one is replaced), up to ``attempts`` times.

Without an address a local cluster is started for the run and stopped after it; with one (``ray start --head``
on the first machine, ``ray start --address HEAD:6379`` on the others, then ``atomkit index --ray HEAD:6379``)
the actors are placed across its machines. Every machine must see the videos under the same paths (a shared
mount) and have atomkit with its weights installed: the workers read the files themselves, only paths and
results travel.
"""
from __future__ import annotations

import collections
import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from atomkit.errors import AtomkitError, InputError
from atomkit.retrieval.indexing import VideoResult, caption_video

# the workers run offline, like the driver (they may be started by a `ray start` outside atomkit)
_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "RAY_USAGE_STATS_ENABLED": "0"}


READY_TIMEOUT_S = 900  # actors that have not loaded their models by then are not coming


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray gives its node the loopback address (read at import)
_AUTH_ENV = "RAY_AUTH_MODE"


def init_local(cpus: int | None = None) -> None:
    """Start a local Ray cluster of ``cpus`` CPUs (default: this machine's) in this process, quietly, without
    the dashboard; ``ray.shutdown()`` stops it.

    The cluster exists only to use this machine's cores, so nothing of it is reachable from the network: its
    node takes the loopback address (every Ray server binds to it) and Ray's token authentication stays on,
    also when the environment says ``RAY_AUTH_MODE=disabled`` (a warning says it was overridden). A cluster
    that cannot be kept on loopback is stopped at once (:class:`ClusterError`)."""
    import ray
    from ray._private import ray_constants

    if os.environ.get(_AUTH_ENV, "").lower() == "disabled":
        print(f"atomkit: {_AUTH_ENV}=disabled ignored: the local Ray cluster keeps its token authentication on "
              f"(start a cluster yourself with `ray start --head` and pass --ray ADDRESS to choose otherwise)",
              file=sys.stderr)
    saved = {k: os.environ.get(k) for k in (_LOOPBACK_ENV, _AUTH_ENV)}
    was = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({_LOOPBACK_ENV: "0", _AUTH_ENV: "token"})  # the cluster's processes start with these
    ray_constants.ENABLE_RAY_CLUSTER = False  # ray read _LOOPBACK_ENV when it was imported, maybe before now
    _reload_auth_mode()
    try:
        ray.init(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", object_store_memory=256 * 2**20)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    where = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(where).is_loopback or not token_auth_on():
        ray.shutdown()
        raise ClusterError(f"the local Ray cluster came up on {where} with token authentication "
                           f"{'on' if token_auth_on() else 'off'}; atomkit stopped it (it must stay on this machine)")


def _reload_auth_mode() -> None:
    """Ray caches its configuration (the authentication mode among it) per process: read the environment again."""
    from ray._raylet import Config

    Config.initialize("")


def token_auth_on() -> bool:
    """Whether this process's Ray uses token authentication."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


class ClusterError(AtomkitError):
    """The Ray cluster could not be reached, or its workers could not load the models."""


class _Worker:
    """One Ray actor: a resident Session, reused for every video it is given."""

    def __init__(self, settings: dict):
        from atomkit.config import quiet_libraries
        from atomkit.pipeline.session import Session

        quiet_libraries()
        self.session = Session(**settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def ready(self) -> dict:
        """Load every module now (so the first video does not pay for it); who and where this worker is."""
        t0 = time.perf_counter()
        try:
            for module in self.session.spec.modules:
                self.session.get(module)
        except Exception as e:  # atomkit's typed errors do not pickle; their message is what the driver needs
            raise RuntimeError(f"{type(e).__name__}: {e}") from None
        return {"worker": self.name, "pid": os.getpid(), "device": self.session.options.device,
                "load_s": round(time.perf_counter() - t0, 3)}

    def caption(self, path: str) -> VideoResult:
        try:
            result = caption_video(self.session, Path(path))
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {e}") from None
        result.worker = self.name
        return result


class RayCaptioner:
    """Captions videos on Ray actors for ``atomkit.retrieval.indexing.update(..., captioner=...)``.

    Args:
        session: The driver's session; its ``settings()`` build each actor's session (the driver loads nothing).
        address: A running cluster (``HOST:6379`` or ``auto``); None starts a local one for this run.
        actors: How many actors (default: the cluster's CPUs // ``cpus_per_actor``, at least 1).
        cpus_per_actor: CPUs reserved per actor; its torch threads follow (default 1).
        gpus_per_actor: GPUs per actor (0: CPU workers).
        attempts: How many actors a video may be given before it is reported as failed (default 3).
        local_cpus: CPUs of the local cluster (default: this machine's).

    Use as a context manager: the actors (and a local cluster) are stopped on exit.
    """

    name = "ray"

    def __init__(self, session, *, address: str | None = None, actors: int | None = None, cpus_per_actor: float = 1,
                 gpus_per_actor: float = 0, attempts: int = 3, local_cpus: int | None = None):
        if actors is not None and actors < 1:
            raise InputError(f"--actors must be at least 1, got {actors}")
        if not cpus_per_actor > 0 or not gpus_per_actor >= 0 or attempts < 1:
            raise InputError(f"--cpus-per-actor must be > 0 (got {cpus_per_actor}), --gpus-per-actor >= 0 "
                             f"(got {gpus_per_actor}) and attempts >= 1 (got {attempts})")
        self.settings = session.settings()
        self.address, self.n_actors, self.local_cpus = address, actors, local_cpus
        self.cpus_per_actor, self.gpus_per_actor, self.attempts = cpus_per_actor, gpus_per_actor, attempts
        self.actors: list = []
        self.workers: list[dict] = []  # what each actor's ready() said, in start order
        self.names: list[str] = []  # the worker in each actor slot ("host:pid")
        self.assignments: dict[Path, str] = {}  # video in flight -> the worker captioning it
        self.deaths = 0
        self.retried: list[str] = []
        self.per_worker: collections.Counter = collections.Counter()
        self.startup_s = 0.0
        self._connected = False  # this captioner called ray.init (a local cluster, or a connection to one)

    # -- cluster -------------------------------------------------------------------------------------
    def __enter__(self) -> "RayCaptioner":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        import ray

        for k, v in _WORKER_ENV.items():
            os.environ.setdefault(k, v)
        t0 = time.perf_counter()
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
                else:
                    init_local(self.local_cpus)
                self._connected = True
            except Exception as e:  # ConnectionError, a timeout, a version mismatch: all say what to do
                raise ClusterError(f"could not {'reach the Ray cluster at ' + self.address if self.address else 'start a local Ray cluster'}: "
                                   f"{e}. Start one with `ray start --head` and pass its address, or omit the "
                                   "address for a local cluster") from e
        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
        n = self.n_actors or max(1, int(cpus // self.cpus_per_actor))
        if n * self.cpus_per_actor > cpus or n * self.gpus_per_actor > gpus:  # they would wait for ever
            self.stop()
            raise InputError(f"{n} actor(s) x {self.cpus_per_actor:g} CPU / {self.gpus_per_actor:g} GPU need more than "
                             f"the cluster has ({cpus:g} CPUs, {gpus:g} GPUs): lower --actors or the per-actor share")
        self.actors = [self._new_actor() for _ in range(n)]
        try:
            self.workers = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
            self.names = [w["worker"] for w in self.workers]
        except ray.exceptions.GetTimeoutError as e:
            self.stop()
            raise ClusterError(f"the Ray actors were not ready after {READY_TIMEOUT_S} s (is the cluster busy?)") from e
        except ray.exceptions.RayError as e:
            self.stop()
            raise ClusterError(f"the Ray workers could not load {self.settings['model']!r}: {_cause(e)}") from e
        self.startup_s = time.perf_counter() - t0

    def _new_actor(self):
        import ray

        cls = ray.remote(_Worker).options(num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor,
                                          max_restarts=0, runtime_env={"env_vars": {
                                              **_WORKER_ENV, "OMP_NUM_THREADS": str(max(1, int(self.cpus_per_actor)))}})
        return cls.remote(self.settings)

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.actors = []
        if self._connected:  # stops a local cluster; from a running one, only this driver disconnects
            ray.shutdown()
            self._connected = False

    # -- work ----------------------------------------------------------------------------------------
    def run(self, paths: list[Path], cancel: threading.Event | None = None) -> Iterator[tuple[Path, VideoResult]]:
        """Yield (path, result) as actors finish, in completion order. A video whose actor died goes to
        another actor (the dead one is replaced) until it has had ``attempts`` tries."""
        import ray

        if not self.actors:
            raise ClusterError("RayCaptioner.run before start(): use it as a context manager")
        queue = collections.deque(paths)
        tries: collections.Counter = collections.Counter()
        idle = list(range(len(self.actors)))
        inflight: dict = {}  # ObjectRef of a caption -> (actor slot, path)
        starting: dict = {}  # ObjectRef of a replacement's ready() -> actor slot
        replaced = 0

        def replace(slot: int, e: Exception) -> None:
            nonlocal replaced
            self.deaths += 1
            replaced += 1
            if replaced > self.attempts * len(self.actors):
                raise ClusterError(f"Ray workers keep dying ({self.deaths} deaths); last: {_cause(e)}") from e
            self.names[slot] = f"replacement of {self.names[slot]}"
            self.actors[slot] = self._new_actor()
            starting[self.actors[slot].ready.remote()] = slot  # takes work once loaded; the others go on meanwhile

        while queue or inflight:
            if cancel is not None and cancel.is_set():
                return  # the actors stop with the captioner; nothing unfinished is stored
            while idle and queue:
                slot, path = idle.pop(), queue.popleft()
                tries[path] += 1
                inflight[self.actors[slot].caption.remote(str(path))] = (slot, path)
                self.assignments[path] = self.names[slot]
            ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in starting:
                    slot = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        replace(slot, e)
                        continue
                    self.workers.append(info)
                    self.names[slot] = info["worker"]
                    idle.append(slot)
                    continue
                slot, path = inflight.pop(ref)
                self.assignments.pop(path, None)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    replace(slot, e)
                    if tries[path] < self.attempts:
                        self.retried.append(str(path))
                        queue.appendleft(path)  # to the first actor that is free
                    else:
                        yield path, VideoResult(failed=f"its Ray worker died {tries[path]} times: {_cause(e)}")
                    continue
                except ray.exceptions.RayTaskError as e:  # the worker raised (a bug, not the file): report it
                    idle.append(slot)
                    yield path, VideoResult(failed=f"the Ray worker raised {_cause(e)}")
                    continue
                idle.append(slot)
                self.per_worker[result.worker] += 1
                yield path, result

    def stats(self) -> dict:
        return {"backend": "ray", "address": self.address or "local", "actors": len(self.actors),
                "cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor,
                "startup_s": round(self.startup_s, 3), "deaths": self.deaths, "retried": self.retried,
                "videos_per_worker": dict(self.per_worker), "workers": self.workers}


def _cause(e: Exception) -> str:
    """The worker's own error (the atomkit message that says what to do), without Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception) and cause is not e:
        return " ".join(str(cause).split()) or type(cause).__name__
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(e).__name__
