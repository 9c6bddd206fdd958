"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and histograms.

Updated only from the server's event loop, so no locks."""

import bisect
import math
from collections import defaultdict

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple, float] = defaultdict(float)
        if not labels:
            self.values[()] = 0.0

    def inc(self, *labels, by: float = 1.0) -> None:
        self.values[labels] += by

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip((*self.buckets, math.inf), self.counts):
            total += c
            lines.append(f'{self.name}_bucket{{le="{_num(le)}"}} {total}')
        lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


def gauge(name: str, help: str, value: float) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]


class ServerMetrics:
    def __init__(self):
        self.requests = Counter("mixr_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.aborts = Counter("mixr_request_aborts_total",
                              "Generation requests aborted before finishing (client disconnect, shutdown).")
        self.prompt_tokens = Counter("mixr_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("mixr_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("mixr_time_to_first_token_seconds",
                              "From request arrival to the first generated token.", TTFT_BUCKETS)
        self.latency = Histogram("mixr_e2e_request_latency_seconds",
                                 "From request arrival to the last token, for requests that finished.",
                                 LATENCY_BUCKETS)
        self.content_filtered = Counter("mixr_content_filter_total",
                                        "Requests (stage=input) and choices (stage=output) the content filter blocked.",
                                        ("stage",))

    def render(self, gauges: list[tuple[str, str, float]]) -> str:
        lines = []
        for m in (self.requests, self.aborts, self.prompt_tokens, self.generation_tokens, self.ttft, self.latency,
                  self.content_filtered):
            lines += m.render()
        for name, help, value in gauges:
            lines += gauge(name, help, value)
        return "\n".join(lines) + "\n"
