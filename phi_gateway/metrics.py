"""Prometheus metrics, served on the admin port (``admin.py``).

Labels are bounded and carry no PHI: route templates (never concrete paths, which hold
ids), known HTTP methods, status codes, policy names, AWS operations and outcomes. The
cache and audit counters are read from their own stats objects at scrape time, so the
request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from phi_gateway.audit import AuditEmitter
from phi_gateway.cache import DataKeyCache
from phi_gateway.transform import Report

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "(unmatched)"  # the route label of requests no policy names
REFUSED = "(refused)"  # refused before routing (an ambiguous path)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: a cached request is ~1 ms, a KMS round trip 5-50 ms, a timeout 5-30 s.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FIELD_ACTIONS = ("encrypted", "decrypted", "withheld", "redacted", "indexed")


def method_label(method: str) -> str:
    """Client-chosen text must not become a label: anything unusual is "other"."""
    return method if method in _METHODS else "other"


class Metrics:
    """The gateway's metrics, in a registry of its own (several gateways can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "phi_gateway_requests",
            "Requests answered, by route template, method and status (0: the client left first).",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "phi_gateway_request_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "phi_gateway_upstream_seconds",
            "Time from handing a request to the upstream to its response head.",
            ["route"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.fields = Counter(
            "phi_gateway_fields",
            "Fields by policy and action: encrypted, decrypted, withheld (masked, removed, left "
            "as token), redacted (failed to authenticate), indexed (blind indexes written).",
            ["policy", "action"],
            registry=r,
        )
        self.stale_pepper = Counter(
            "phi_gateway_stale_pepper_keys",
            "Data keys that opened only under an older pepper version's KMS context: rewrap is due.",
            ["policy"],
            registry=r,
        )
        self.aws_calls = Counter(
            "phi_gateway_aws_calls",
            "AWS operations (KMS, Secrets Manager, CloudWatch Logs, STS) by outcome.",
            ["service", "operation", "outcome"],
            registry=r,
        )
        self.aws_seconds = Histogram(
            "phi_gateway_aws_call_seconds",
            "AWS operation latency, retries included.",
            ["service", "operation"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            "phi_gateway_policy_reloads",
            "Policy reloads: loaded (swapped in) or rejected (invalid; the old set stays in force).",
            ["outcome"],
            registry=r,
        )
        self.ready = Gauge("phi_gateway_ready", "1 when the last readiness check passed.", registry=r)
        self._stats = _StatsCollector()
        r.register(self._stats)

    def watch(self, cache: DataKeyCache | None, audit: AuditEmitter | None) -> None:
        """Report this cache's and this audit emitter's counters at scrape time."""
        self._stats.cache, self._stats.audit = cache, audit

    def request(self, route: str, method: str, status: int | None, seconds: float) -> None:
        method = method_label(method)
        self.requests.labels(route, method, str(status or 0)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def upstream(self, route: str, seconds: float) -> None:
        self.upstream_seconds.labels(route).observe(seconds)

    def report(self, policy: str, report: Report) -> None:
        for action in _FIELD_ACTIONS:
            count = sum(getattr(report, action).values())
            if count:
                self.fields.labels(policy, action).inc(count)
        if report.stale_pepper:
            self.stale_pepper.labels(policy).inc(report.stale_pepper)

    def aws_call(self, service: str, operation: str, outcome: str, seconds: float) -> None:
        self.aws_calls.labels(service, operation, outcome).inc()
        self.aws_seconds.labels(service, operation).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    def __init__(self) -> None:
        self.cache: DataKeyCache | None = None
        self.audit: AuditEmitter | None = None

    def describe(self) -> list[Metric]:
        return []  # families vary with what is watched; the registry then asks collect()

    def collect(self) -> Iterator[Metric]:
        if self.cache is not None:
            s = self.cache.stats
            yield _counter(
                "phi_gateway_cache_hits",
                "Data-key cache hits.",
                "kind",
                {"encrypt": s.encrypt_hits, "decrypt": s.decrypt_hits},
            )
            yield _counter(
                "phi_gateway_cache_misses",
                "Data-key cache misses (each one a key-service call, or a wait for one in flight).",
                "kind",
                {"encrypt": s.encrypt_misses, "decrypt": s.decrypt_misses},
            )
            yield _counter(
                "phi_gateway_cache_evictions",
                "Data keys dropped: capacity (LRU) or expired (age, uses or bytes).",
                "reason",
                {"capacity": s.evictions, "expired": s.expirations},
            )
            yield CounterMetricFamily(
                "phi_gateway_cache_refusals",
                "Unwraps refused from memory: a wrapped key that did not open under its context lately.",
                value=s.refusals,
            )
            yield GaugeMetricFamily(
                "phi_gateway_cache_entries", "Data keys held in the cache.", value=len(self.cache)
            )
        if self.audit is not None:
            a = self.audit.stats
            yield GaugeMetricFamily(
                "phi_gateway_audit_queue_depth", "Audit events not yet written.", value=a.queue_depth
            )
            for name, help_text, value in (
                ("audit_events_written", "Audit events the sink acknowledged.", a.written),
                ("audit_events_dropped", "Audit events dropped (never silently).", a.dropped),
                ("audit_write_failures", "Failed audit sink writes, retries included.", a.write_failures),
            ):
                yield CounterMetricFamily(f"phi_gateway_{name}", help_text, value=value)
            last_seq = getattr(self.audit.sink, "last_seq", None)
            if last_seq is not None:  # a hash-chained file: what `audit verify --expected-last-seq` wants
                yield GaugeMetricFamily(
                    "phi_gateway_audit_last_seq",
                    "Sequence number of the last record in the chained file.",
                    value=last_seq,
                )


def _counter(name: str, help_text: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
