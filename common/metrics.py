"""Prometheus metrics of both servers (prometheus-client), served at `/metrics` on the HTTP port.

Three sources, each recorded in one place:
- Every RPC, on both transports: `tokenfeedback_rpc_requests_total{transport, method, code}` and
  `tokenfeedback_rpc_duration_seconds{transport, method}` (a stream counts until its last message),
  recorded by the guards every call already passes (common/guard.py), so no RPC body is touched.
  `method` is a full method path the server serves (unknown paths never become labels).
- The engines' state, read from their public status when Prometheus scrapes (`watch_policy`,
  `watch_trainer`: a custom Collector, nothing to keep in step with the engines).
- A few events only an engine sees (a token sampled, a first token, a weight swap, a publish),
  counted through `policy_meter()` / `trainer_meter()`: plain prometheus-client objects, nothing of
  gRPC, created on first use so each server exposes only its own.

The process collectors of prometheus-client (resident memory, CPU seconds, open files) come with
the default registry. `/metrics` needs no token: it carries counts and timings, never annotation
content or prompts (docs/design.md, "Security").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PATH = "/metrics"

disable_created_metrics()  # no `*_created` twin of every counter: a process start time says as much

# Latency buckets in seconds: from a cached tokenize (ms) to a long Train call (minutes).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

RPC_REQUESTS = Counter("tokenfeedback_rpc_requests_total", "RPCs finished, by transport (grpc | connect), "
                       "full method path and status code (OK, INVALID_ARGUMENT, ...)",
                       ["transport", "method", "code"])
RPC_SECONDS = Histogram("tokenfeedback_rpc_duration_seconds", "RPC duration from its start to its status "
                        "(streams: to the last message), by transport and method",
                        ["transport", "method"], buckets=SECONDS_BUCKETS)


def record_rpc(transport: str, method: str, code: str, seconds: float) -> None:
    """One finished RPC (the guards call this; `code` is a status name such as "OK")."""
    RPC_REQUESTS.labels(transport, method, code).inc()
    RPC_SECONDS.labels(transport, method).observe(seconds)


# ---- counters the engines feed ----------------------------------------------------------------


class PolicyMeter:
    """What the policy engine counts as it goes (the rest is read from its status at scrape time)."""

    def __init__(self, registry=REGISTRY):
        self.tokens = Counter("tokenfeedback_policy_tokens_generated_total",
                              "tokens sampled and streamed, all streams together", registry=registry)
        self.first_token = Histogram("tokenfeedback_policy_time_to_first_token_seconds",
                                     "from a Generate request being queued to its first token",
                                     buckets=SECONDS_BUCKETS, registry=registry)
        self.update = Histogram("tokenfeedback_policy_weight_update_seconds",
                                "a weight update's swap into the running model (checks, copy, version bump)",
                                buckets=SECONDS_BUCKETS, registry=registry)


class TrainerMeter:
    """What the trainer counts as it goes."""

    def __init__(self, registry=REGISTRY):
        self.publish = Histogram("tokenfeedback_trainer_publish_seconds",
                                 "sending one version of the weights to one policy server", ["policy"],
                                 buckets=SECONDS_BUCKETS, registry=registry)
        self.published_bytes = Counter("tokenfeedback_trainer_published_bytes_total",
                                       "weight bytes sent to policy servers", ["policy"], registry=registry)


_meters: dict[type, object] = {}
_meters_lock = threading.Lock()


def _meter(kind: type):
    with _meters_lock:
        if kind not in _meters:
            _meters[kind] = kind()
        return _meters[kind]


def policy_meter() -> PolicyMeter:
    return _meter(PolicyMeter)


def trainer_meter() -> TrainerMeter:
    return _meter(TrainerMeter)


# ---- state read at scrape time ----------------------------------------------------------------


class _Status(Collector):
    """Families computed by the watched sources at each scrape. One per process; a second watch of
    the same name (a restarted engine in a test process) replaces the first."""

    def __init__(self):
        self.sources: dict[str, Callable[[], Iterable]] = {}
        self._failed: set[str] = set()

    def collect(self):
        for name, source in list(self.sources.items()):
            try:
                families = list(source())
            except Exception as exc:  # noqa: BLE001 - a status that cannot be read (still loading) is left out
                if name not in self._failed:
                    log.warning("metrics: %s status unreadable, left out of /metrics: %s: %s",
                                name, type(exc).__name__, exc)
                    self._failed.add(name)
                continue
            self._failed.discard(name)
            yield from families


_status = _Status()
REGISTRY.register(_status)


def watch(name: str, source: Callable[[], Iterable]) -> None:
    """Report `source()`'s metric families at every scrape, under `name` (replacing an earlier one)."""
    _status.sources[name] = source


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def watch_policy(engine) -> None:
    """The policy engine's public state: streams running and queued, the weight version."""

    def families():
        yield _gauge("tokenfeedback_policy_streams_running", "Generate streams being decoded now", engine.running)
        yield _gauge("tokenfeedback_policy_streams_queued", "Generate requests waiting for a decoding slot",
                     engine.queued)
        yield _gauge("tokenfeedback_policy_weight_version", "version of the weights serving now (0: as loaded)",
                     engine.version)

    watch("policy", families)


def watch_trainer(engine) -> None:
    """The trainer engine's status (one `engine.status()` per scrape): annotations, rows, steps,
    the last step's loss / KL / beta, and each policy replica's version and lag."""

    def families():
        status = engine.status()
        annotations = GaugeMetricFamily("tokenfeedback_trainer_annotations",
                                        "annotations in the store by state (pending: not trained on yet)",
                                        labels=["state"])
        for state, count in status.counts.items():
            if state not in ("total", "rows"):
                annotations.add_metric([state], float(count))
        yield annotations
        yield _gauge("tokenfeedback_trainer_rows", "training rows of the annotations not withdrawn",
                     status.counts.get("rows", 0))
        yield CounterMetricFamily("tokenfeedback_trainer_steps", "optimizer steps taken (kept across restarts)",
                                  value=float(status.step))
        yield _gauge("tokenfeedback_trainer_model_version", "version of the trainer's current weights",
                     status.model_version)
        yield _gauge("tokenfeedback_trainer_loss", "total loss of the last step", status.last_loss)
        yield _gauge("tokenfeedback_trainer_token_loss", "the annotation term of the last step's loss",
                     status.last_token_loss)
        yield _gauge("tokenfeedback_trainer_kl", "mean KL to the reference at the last step", status.last_kl)
        yield _gauge("tokenfeedback_trainer_beta", "the KL coefficient in use", status.beta)
        yield _gauge("tokenfeedback_trainer_training", "1 while a Train call runs", 1.0 if status.training else 0.0)
        version = GaugeMetricFamily("tokenfeedback_trainer_policy_version",
                                    "weight version each policy server holds (-1: unknown / unreachable)",
                                    labels=["policy"])
        lag = GaugeMetricFamily("tokenfeedback_trainer_policy_lag",
                                "versions a policy server is behind the trainer (unknown counts as fully behind)",
                                labels=["policy"])
        reachable = GaugeMetricFamily("tokenfeedback_trainer_policy_reachable",
                                      "1 when the last contact with the policy server worked", labels=["policy"])
        seconds = GaugeMetricFamily("tokenfeedback_trainer_policy_last_publish_seconds",
                                    "duration of the last publish to the policy server", labels=["policy"])
        sent = GaugeMetricFamily("tokenfeedback_trainer_policy_last_publish_bytes",
                                 "bytes of the last publish to the policy server", labels=["policy"])
        for policy in status.policies:
            held = policy.model_version
            version.add_metric([policy.address], float(held))
            lag.add_metric([policy.address], float(status.model_version - held))
            reachable.add_metric([policy.address], 1.0 if policy.reachable else 0.0)
            seconds.add_metric([policy.address], float(policy.last_publish_seconds))
            sent.add_metric([policy.address], float(policy.last_publish_bytes))
        yield from (version, lag, reachable, seconds, sent)

    watch("trainer", families)


# ---- the endpoint -----------------------------------------------------------------------------


async def serve_metrics(scope, receive, send) -> None:
    """ASGI: GET/HEAD /metrics -> the text exposition format. Collecting may read the trainer's
    store, so it runs off the event loop."""
    if scope["method"] not in ("GET", "HEAD"):
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"GET /metrics\n"})
        return
    started = time.perf_counter()
    body = await asyncio.to_thread(generate_latest, REGISTRY)
    log.debug("metrics collected in %.3fs", time.perf_counter() - started)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
