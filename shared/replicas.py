"""Several SGLang replicas per LLM role: each task's steps on one replica, health-checked.

``UMI_<ROLE>_LLM_URL`` may list several base URLs. A :class:`ReplicaSet` holds one
:class:`~shared.sglang_client.SGLangClient` per replica and sends every request of a
task to the same replica while it is healthy, so SGLang's radix cache keeps the
task's growing prompt: rendezvous (highest-random-weight) hashing ranks the
replicas for each task id, with ``hashlib`` (not Python's per-process salted
``hash()``), so every worker process ranks them alike. Removing or losing one
replica moves only its own tasks, each to the next replica in that task's ranking;
when it comes back, they return.

Health: a background thread asks every replica's ``GET /health`` each
``UMI_LLM_HEALTH_INTERVAL_S``; a connection error, timeout, 502, 503 or 504 marks a
replica down at once; a good health check (or answer) brings it back. Retries of one
request (:class:`~shared.retry.RetryPolicy`, the same policy as one client's) go to
the next replica in the task's ranking not tried yet, rather than hammering the
one that just failed. When every replica is down they are still tried, in the
task's order: a health check can lag behind a recovered server.

Router mode (``UMI_LLM_ROUTER=true``): the one URL is an SGLang router (sgl-router,
the SGLang Model Gateway). The task id goes as ``X-SMG-Routing-Key``, the header its
``consistent_hashing`` and ``manual`` policies route on (its ``cache_aware`` default
matches the prompt text itself), and ``/tokenize``, which a router does not serve,
is never asked (:func:`shared.llm.fit_to_context` cuts by the UTF-8 byte bound).

``UMI_LLM_ROUTING=round_robin`` sends each request to the next replica instead; it
exists to measure what task-affine routing is worth (``tests/test_replicas.py``).

Usage::

    replicas = replicas_for_role(LLMRole.PLANNER, settings)     # one per worker process
    client = replicas.for_task(task_id.hex)                      # what one step uses
    result = client.generate(request, deadline=deadline)
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from shared.metrics import observe_replica_request, set_replica_up
from shared.retry import RetryPolicy
from shared.sglang_client import (
    GenerateRequest,
    GenerateResult,
    ServerInfo,
    SGLangClient,
    SGLangError,
    SGLangServerError,
    SGLangTimeout,
    SGLangTransportError,
    TokenizeResult,
)

__all__ = ["ROUTING_KEY_HEADER", "Replica", "ReplicaSet", "RoutedClient", "rendezvous_order"]

logger = logging.getLogger(__name__)

#: The header an SGLang router's consistent_hashing / manual policies route on (lightseekorg/smg,
#: ``policies/consistent_hashing.rs``; the router forwards it on its allow-list).
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
#: Answers that mean "this replica cannot serve now" (queue full, a proxy in front of it is cut off).
DOWN_STATUSES = frozenset({502, 503, 504})
#: Timeout of one health check.
HEALTH_TIMEOUT_S = 2.0

T = TypeVar("T")


def replica_label(base_url: str) -> str:
    """``host:port`` of a base URL: the ``replica`` metric label (no credentials, no scheme)."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _weight(key: str, replica: str) -> int:
    """The rendezvous weight of ``replica`` for ``key``: the same in every process and run."""
    digest = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` ranked for ``key`` by highest random weight: the first is the key's home."""
    return sorted(replicas, key=lambda name: _weight(key, name), reverse=True)


@dataclass(eq=False)
class Replica:
    """One SGLang server of a role, and whether it is taken as healthy."""

    client: SGLangClient
    label: str
    up: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ReplicaSet:
    """The SGLang replicas of one role (or one router), shared by a worker process's threads.

    ``clients`` send one attempt each (``max_retries=0``); ``retry`` spreads a request's
    attempts over the replicas. ``router``: the one client is an SGLang router.
    """

    def __init__(
        self,
        role: str,
        clients: Sequence[SGLangClient],
        *,
        retry: RetryPolicy,
        health_interval_s: float = 5.0,
        routing: Literal["task", "round_robin"] = "task",
        router: bool = False,
    ) -> None:
        if not clients:
            raise ValueError("a replica set needs at least one client")
        if router and len(clients) > 1:
            raise ValueError("router mode takes one router URL")
        self.role = role
        self.retry = retry
        self.router = router
        self.routing = routing
        self.replicas = [Replica(client, replica_label(client.base_url)) for client in clients]
        self._by_label = {replica.label: replica for replica in self.replicas}
        if len(self._by_label) != len(self.replicas):
            raise ValueError(f"{role}: two replica URLs name the same host:port")
        self._turn = itertools.count()
        self._stop = threading.Event()
        for replica in self.replicas:
            set_replica_up(role, replica.label, True)
        self._health: threading.Thread | None = None
        if len(self.replicas) > 1:
            self._health = threading.Thread(
                target=self._check_health_forever, args=(health_interval_s,), name=f"health:{role}", daemon=True
            )
            self._health.start()

    # -- what callers use ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The replicas' base URLs, comma-separated (for log lines)."""
        return ",".join(replica.client.base_url for replica in self.replicas)

    @property
    def serves_tokenize(self) -> bool:
        """Whether ``/tokenize`` may be asked: not through a router."""
        return not self.router

    def for_task(self, key: str) -> RoutedClient:
        """A client whose requests go where ``key``'s (a task id's) requests go."""
        return RoutedClient(self, key)

    def generate(
        self, request: GenerateRequest, *, deadline: float | None = None, key: str | None = None
    ) -> GenerateResult:
        """One generation on ``key``'s replica, retried on the next ones; ``attempts`` counts all of them."""
        started = time.monotonic()

        def send(replica: Replica, attempt: int) -> GenerateResult:
            sent = request if attempt == 1 or request.rid is None else request.model_copy(
                update={"rid": f"{request.rid}-retry{attempt - 1}"}  # never the rid of an attempt SGLang may still abort
            )
            return replica.client.generate(sent, deadline=deadline, headers=self._headers(key))

        result, attempts = self._call("/generate", send, key, deadline)
        return result.model_copy(update={"attempts": attempts, "elapsed_s": time.monotonic() - started})

    def tokenize(self, text: str, *, deadline: float | None = None, key: str | None = None) -> TokenizeResult:
        """``/tokenize`` on ``key``'s replica (the same tokenizer serves every replica of a role)."""
        result, _ = self._call(
            "/tokenize", lambda replica, _n: replica.client.tokenize(text, deadline=deadline, headers=self._headers(key)), key, deadline
        )
        return result

    def server_info(self, *, deadline: float | None = None) -> ServerInfo:
        """``/server_info`` of the first healthy replica (every replica of a role runs alike)."""
        return self.order(None)[0].client.server_info(deadline=deadline)

    def order(self, key: str | None) -> list[Replica]:
        """The replicas to try for ``key``, best first: healthy ones in the key's ranking, then the others."""
        if key is None or len(self.replicas) == 1:
            ranked = list(self.replicas)
        elif self.routing == "round_robin":
            start = next(self._turn) % len(self.replicas)
            ranked = self.replicas[start:] + self.replicas[:start]
        else:
            ranked = [self._by_label[label] for label in rendezvous_order(key, list(self._by_label))]
        return [replica for replica in ranked if replica.up] + [replica for replica in ranked if not replica.up]

    def check_health(self) -> None:
        """Ask every replica's ``GET /health`` once and mark it up or down."""
        for replica in self.replicas:
            self._mark(replica, replica.client.health(timeout_s=HEALTH_TIMEOUT_S))

    def close(self) -> None:
        """Stop the health checks and close every replica's connection pool."""
        self._stop.set()
        for replica in self.replicas:
            replica.client.close()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _headers(self, key: str | None) -> dict[str, str] | None:
        return {ROUTING_KEY_HEADER: key} if self.router and key is not None else None

    def _call(
        self, path: str, send: Callable[[Replica, int], T], key: str | None, deadline: float | None
    ) -> tuple[T, int]:
        """``send`` on ``key``'s replica until it answers, each retry on the next replica not tried yet."""
        tried: set[Replica] = set()

        def attempt(number: int) -> tuple[T, int]:
            candidates = [replica for replica in self.order(key) if replica not in tried] or self.order(key)
            replica = candidates[0]
            tried.add(replica)
            try:
                result = send(replica, number)
            except SGLangError as exc:
                observe_replica_request(self.role, replica.label, ok=False)
                if _means_down(exc):
                    self._mark(replica, False)
                exc.attempts = number
                raise
            observe_replica_request(self.role, replica.label, ok=True)
            self._mark(replica, True)  # an answer proves it serves (a lone replica has no health thread)
            return result, number

        def log_retry(exc: Exception, retry: int, delay: float) -> None:
            logger.warning(
                "SGLang %s for %s failed (attempt %d of %d): %s; retrying in %.2fs on the next replica",
                path, self.role, retry, self.retry.max_retries + 1, exc, delay,
            )  # fmt: skip

        return self.retry.call(attempt, transient=_is_transient, deadline=deadline, on_retry=log_retry)

    def _mark(self, replica: Replica, up: bool) -> None:
        with replica.lock:
            if replica.up == up:
                return
            replica.up = up
        set_replica_up(self.role, replica.label, up)
        if up:
            logger.warning("%s SGLang replica %s is healthy again: its tasks return to it", self.role, replica.label)
        else:
            logger.warning("%s SGLang replica %s is down: its tasks go to their next replica", self.role, replica.label)

    def _check_health_forever(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check_health()
            except Exception:  # a health round must never end the thread
                logger.exception("%s replica health check failed", self.role)


def _is_transient(exc: Exception) -> bool:
    return isinstance(exc, SGLangTransportError | SGLangServerError)


def _means_down(exc: SGLangError) -> bool:
    """Whether an error says the replica cannot serve (not: this request was bad, or the caller's time ran out)."""
    if isinstance(exc, SGLangTimeout) and exc.attempts == 0:
        return False  # the deadline passed before any HTTP exchange
    if isinstance(exc, SGLangTransportError):
        return True
    return isinstance(exc, SGLangServerError) and exc.status_code in DOWN_STATUSES


class RoutedClient:
    """A :class:`ReplicaSet` bound to one task: the client interface one step uses."""

    def __init__(self, replicas: ReplicaSet, key: str) -> None:
        self.replicas = replicas
        self.key = key

    @property
    def base_url(self) -> str:
        return self.replicas.base_url

    @property
    def serves_tokenize(self) -> bool:
        return self.replicas.serves_tokenize

    def generate(self, request: GenerateRequest, *, deadline: float | None = None) -> GenerateResult:
        return self.replicas.generate(request, deadline=deadline, key=self.key)

    def tokenize(self, text: str, *, deadline: float | None = None) -> TokenizeResult:
        return self.replicas.tokenize(text, deadline=deadline, key=self.key)

    def server_info(self, *, deadline: float | None = None) -> ServerInfo:
        return self.replicas.server_info(deadline=deadline)
