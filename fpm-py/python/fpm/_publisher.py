"""What the drop-in ``_FpmPublisherThread`` classes share: the emitter behind them."""

from __future__ import annotations

from fpm._native import Emitter


def _ignore(metrics) -> None:
    """``publish`` while paused or after ``shutdown``: ignored, as upstream."""


class Publisher:
    """Binds exactly ``endpoint`` (the engines pass their per-rank address) and publishes the
    engine's finished messages; ``publish`` is the native method itself (no Python frame)."""

    SHUTDOWN_TIMEOUT: float = 1.0
    HEARTBEAT_INTERVAL: float = 1.0

    def __init__(self, endpoint: str, worker_id: str, dp_rank: int, max_queue_size: int = 10_000) -> None:
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
        self.publish = self._emitter.publish

    def publish(self, metrics) -> None:  # replaced per instance by the native method
        """Queues ``metrics`` (its wall time as the engine measured it); never blocks."""
        self._emitter.publish(metrics)

    def stats(self) -> dict:
        """The emitter's counters (published, heartbeats, dropped by reason, ...); after
        ``shutdown``, the final ones."""
        if not self._running:
            return self._final
        return self._emitter.stats()

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self.publish = _ignore
        self._final = self._emitter.shutdown(self.SHUTDOWN_TIMEOUT)
