"""What the async front end reports as it serves, behind one small interface.

The server's Prometheus metrics implement it (server/metrics.py); the engine itself imports no
metrics library, and the default logger does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.engine.core_messages import CoreStats


@dataclass
class FinishedRequestStats:
    """One request that ended with stop or length (all its n samples together)."""

    num_prompt_tokens: int
    num_generation_tokens: int  # over all samples, as usage.completion_tokens
    n: int
    max_tokens: int  # the limit in force: the request's, or what max_model_len leaves
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> last token


class StatLogger:
    """Receives per-request timings and periodic engine snapshots. Every method is cheap and
    called on the event loop; all times are seconds."""

    def record_core_stats(self, stats: CoreStats) -> None:
        """A snapshot from the engine core (its counters are cumulative since start)."""

    def record_scheduled(self, queue_time: float) -> None:
        """A request left the waiting queue for the first time."""

    def record_first_token(self, time_to_first_token: float, num_prompt_tokens: int) -> None:
        """A request's first token arrived (its prompt is processed)."""

    def record_tokens(self, num_tokens: int, inter_token_latency: float | None) -> None:
        """A request got num_tokens more tokens; the latency is since its previous ones
        (None for the first)."""

    def record_finished(self, finish_reason: str, e2e_latency: float) -> None:
        """A request ended: stop | length | abort | error."""

    def record_request(self, stats: FinishedRequestStats) -> None:
        """A request ended with stop or length (after its record_finished)."""

    def record_iteration(self, num_tokens: int) -> None:
        """An engine step came back having computed num_tokens tokens (prompt and decode)."""

    def record_rejected(self, reason: str) -> None:
        """A request was turned away (queue_full, queue_time, draining, not_ready)."""
