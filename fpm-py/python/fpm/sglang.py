"""Drop-in for SGLang 0.5.23's ``_FpmPublisherThread``
(``sglang/srt/observability/forward_pass_metrics.py``): same constructor and methods, backed by
the Rust emitter (no Python thread, no GIL held while publishing).

Switch with one import::

    from fpm.sglang import _FpmPublisherThread

Differences from upstream, all in the direction of counting what upstream loses silently:
a full queue, a send that would block and a message published before any subscriber are
counted by reason in ``stats()``; the publisher's counter frame and ``counter_id`` are the
emitter's, as upstream's are its own.
"""

from __future__ import annotations

from fpm._native import Emitter


class _FpmPublisherThread:
    """Publishes the ForwardPassMetrics SGLang's scheduler hands it (heartbeats while idle)."""

    SHUTDOWN_TIMEOUT: float = 1.0
    HEARTBEAT_INTERVAL: float = 1.0

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        dp_rank: int,
        max_queue_size: int = 10_000,
    ) -> None:
        # SGLang passes the exact per-rank address it binds.
        self._emitter = Emitter(
            endpoint,
            worker_id,
            dp_rank,
            clock="cpu",
            queue_size=max_queue_size,
            heartbeat_interval=self.HEARTBEAT_INTERVAL,
            exact=True,
        )
        self._running = True
        # The hot path is the native method itself (no Python frame in between).
        self.publish = self._emitter.publish

    def set_idle(self, idle: bool) -> None:
        """Set whether the scheduler permits idle heartbeats."""
        self._emitter.set_idle(idle)

    def publish(self, metrics) -> None:  # replaced per instance by the native method
        """Queues ``metrics`` (its wall time as measured by SGLang); never blocks."""
        self._emitter.publish(metrics)

    def stats(self) -> dict:
        """The emitter's counters (published, dropped by reason, ...)."""
        return self._emitter.stats()

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self.publish = _ignore
        self._final = self._emitter.shutdown(self.SHUTDOWN_TIMEOUT)


def _ignore(metrics) -> None:
    """``publish`` after ``shutdown``: ignored, as upstream."""
