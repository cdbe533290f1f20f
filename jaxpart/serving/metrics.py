"""The server's Prometheus metrics (prometheus-client): latency histograms, queue and pool
gauges, the preemption counter. One registry per server, so two servers in one process (the
tests) do not share series. Fed from the engine thread through OnlineEngine's observer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# Seconds: 1 ms .. 60 s, 15% apart (p50 read from the buckets within ~7% of the true one).
BUCKETS = tuple(round(0.001 * 1.15 ** i, 6) for i in range(64)) + (10.0, 20.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
  """jaxpart_* series; observe(kind, value) is the engine's observer."""

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.ttft = Histogram("jaxpart_time_to_first_token_seconds",
                          "request arrival to its first token on the host", registry=r,
                          buckets=BUCKETS)
    self.itl = Histogram("jaxpart_inter_token_latency_seconds",
                         "time between a request's consecutive tokens", registry=r,
                         buckets=BUCKETS)
    self.e2e = Histogram("jaxpart_e2e_request_latency_seconds",
                         "request arrival to its end", registry=r, buckets=BUCKETS)
    self.overhead = Histogram("jaxpart_http_overhead_seconds",
                              "a request's time outside the engine (HTTP, tokenization, "
                              "streaming): request time minus the engine's", registry=r,
                              buckets=(0.0001, 0.00025, 0.0005, 0.001) + BUCKETS)
    self.waiting = Gauge("jaxpart_requests_waiting", "requests queued, not yet running",
                         registry=r)
    self.running = Gauge("jaxpart_requests_running", "requests holding a sequence slot",
                         registry=r)
    self.blocks = Gauge("jaxpart_kv_blocks_used", "KV cache blocks held by requests", registry=r)
    self.preemptions = Counter("jaxpart_preemptions", "running requests preempted for blocks",
                               registry=r)
    self.http = Counter("jaxpart_http_errors", "HTTP requests refused, by status", ["status"],
                        registry=r)

  def observe(self, kind: str, value) -> None:
    if kind == "state":
      waiting, running, blocks = value
      self.waiting.set(waiting)
      self.running.set(running)
      self.blocks.set(blocks)
    elif kind == "preempt":
      self.preemptions.inc(value)
    else:
      {"ttft": self.ttft, "itl": self.itl, "e2e": self.e2e}[kind].observe(value)

  def text(self) -> bytes:
    return generate_latest(self.registry)
