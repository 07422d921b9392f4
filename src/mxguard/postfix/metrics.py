"""The Postfix policy server's counters and lookup-latency histogram, for ``/metrics``.

``Metrics`` only counts: the server and the served-policy recorder bump its fields, and
``render()`` writes them in the Prometheus text format together with the gauges the server
reads at that moment, for the HTTP endpoint (``postfix/http.py``) to serve. No I/O, no clock
(callers pass the seconds).
"""

from __future__ import annotations

import bisect

from mxguard.postfix.answers import Answer

TIMEOUT_REASONS = ("no-request", "idle", "send")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and the lookup-latency histogram, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.answers: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        self.budget_expired = 0
        self.malformed = 0
        self.refused_connections = 0
        self.evicted_connections = 0
        # Connections the server closed because a deadline passed, by reason: "no-request"
        # (no complete request within the first-request timeout), "idle" (idle timeout after
        # the last reply), "send" (the client did not take its replies within the send timeout).
        self.connection_timeouts: dict[str, int] = dict.fromkeys(TIMEOUT_REASONS, 0)
        self.resolutions = 0
        self.refreshes = 0
        self.served_recorded = 0
        self.served_failures = 0
        self.served_dropped = 0
        # Resolutions whose policy carried a learned level, by floor state (docs/learned.md).
        self.learned: dict[str, int] = {}
        self._buckets = [0] * (len(_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def answer(self, answer: Answer, seconds: float) -> None:
        self.count(answer.label, seconds)

    def count(self, label: str, seconds: float) -> None:
        """One answer with metrics label ``label`` (``Answer.label``), ``seconds`` after its
        request (a cache hit passes its entry's label, made once)."""
        answers = self.answers
        answers[label] = answers.get(label, 0) + 1
        self._buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self._sum += seconds
        self._count += 1

    def render(self, gauges: dict[str, float], store_errors: dict[str, int] | None = None) -> str:
        """Every counter, the histogram, then ``gauges`` (a ``_total`` name is a counter);
        ``store_errors``: the store's failures by kind (``StoreError.kind``)."""
        out: list[str] = []
        _metric(
            out, "mxguard_postfix_answers_total",
            "Answers given to Postfix, by level (OK) or kind (notfound, temp, perm).",
            [(f'{{kind="{k}"}}', v) for k, v in sorted(self.answers.items())],
        )  # fmt: skip
        for name, help_, value in self._counters():
            _metric(out, name, help_, [("", value)])
        _metric(
            out, "mxguard_policy_failures_total",
            "Failures seen while resolving policies, by RFC 8460 result type.",
            [(f'{{result_type="{k}"}}', v) for k, v in sorted(self.failures.items())],
        )  # fmt: skip
        _metric(
            out, "mxguard_learned_floors_total",
            "Resolutions with a learned level, by floor state (none, report, enforce, deliver, "
            "bounce).",
            [(f'{{state="{k}"}}', v) for k, v in sorted(self.learned.items())],
        )  # fmt: skip
        _metric(
            out, "mxguard_postfix_connection_timeouts_total",
            "Connections closed by a deadline: no-request (no complete request in time), "
            "idle (idle after the last reply), send (replies not taken by the client).",
            [(f'{{reason="{k}"}}', v) for k, v in sorted(self.connection_timeouts.items())],
        )  # fmt: skip
        _metric(
            out, "mxguard_store_errors_total",
            "Failed store reads and cache writes, by kind (corrupt, full, busy, ioerr, ...).",
            [(f'{{kind="{k}"}}', v) for k, v in sorted((store_errors or {}).items())],
        )  # fmt: skip
        out.extend(self._histogram())
        for name, value in sorted(gauges.items()):
            kind = "counter" if name.endswith("_total") else "gauge"
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name} {value:g}")
        return "\n".join(out) + "\n"

    def _counters(self) -> list[tuple[str, str, float]]:
        """``(name, help, value)`` of each unlabelled counter, in the order they are shown."""
        return [
            ("mxguard_postfix_cache_hits_total", "Lookups answered from the cache.",
             self.cache_hits),
            ("mxguard_postfix_cache_misses_total", "Lookups that needed a resolution.",
             self.cache_misses),
            ("mxguard_postfix_budget_expired_total",
             "Misses answered TEMP because the lookup budget ran out.", self.budget_expired),
            ("mxguard_postfix_malformed_requests_total",
             "Requests that could not be framed or parsed.", self.malformed),
            ("mxguard_postfix_refused_connections_total",
             "New connections closed at once: max_connections were open, all with a "
             "request in flight.", self.refused_connections),
            ("mxguard_postfix_evicted_connections_total",
             "Idle connections (first those that never sent a request) closed to admit a "
             "new one at max_connections.", self.evicted_connections),
            ("mxguard_postfix_resolutions_total", "Policy resolutions (misses and refreshes).",
             self.resolutions),
            ("mxguard_postfix_refreshes_total", "Background refreshes of hot domains.",
             self.refreshes),
            ("mxguard_postfix_served_recorded_total",
             "Changed served policies written to the store.", self.served_recorded),
            ("mxguard_postfix_served_record_failures_total",
             "Served policies that could not be written to the store (or pruned).",
             self.served_failures),
            ("mxguard_postfix_served_dropped_total",
             "Served policies not recorded because too many were waiting.",
             self.served_dropped),
        ]  # fmt: skip

    def _histogram(self) -> list[str]:
        rows: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*_BUCKETS, float("inf")), self._buckets, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            rows.append((f'_bucket{{le="{le}"}}', running))
        rows += [("_sum", self._sum), ("_count", self._count)]
        return [
            "# HELP mxguard_postfix_lookup_seconds Time from request to answer.",
            "# TYPE mxguard_postfix_lookup_seconds histogram",
            *(f"mxguard_postfix_lookup_seconds{suffix} {v:g}" for suffix, v in rows),
        ]


def _metric(out: list[str], name: str, help_: str, rows: list[tuple[str, float]]) -> None:
    """One counter family: its HELP and TYPE lines, then one line per labelled value."""
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} counter")
    out.extend(f"{name}{labels} {value:g}" for labels, value in rows)
