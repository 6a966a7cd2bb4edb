"""Drop-in for Dynamo 1.6.1's vLLM ``_FpmPublisherThread``
(``dynamo/vllm/instrumented_scheduler.py``): same constructor (``start_paused`` included) and
methods, backed by the Rust emitter.

Switch with one import::

    from fpm.vllm import _FpmPublisherThread

As upstream, heartbeats go out whenever nothing was published for a heartbeat interval, and
``publish`` is ignored while paused (before ``resume()``).
"""

from __future__ import annotations

from fpm._native import Emitter


class _FpmPublisherThread:
    """Publishes the ForwardPassMetrics Dynamo's instrumented vLLM scheduler hands it."""

    SHUTDOWN_TIMEOUT: float = 1.0
    HEARTBEAT_INTERVAL: float = 1.0

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        dp_rank: int,
        max_queue_size: int = 10_000,
        start_paused: bool = False,
    ) -> None:
        self._emitter = Emitter(
            endpoint,
            worker_id,
            dp_rank,
            clock="cpu",
            queue_size=max_queue_size,
            heartbeat_interval=self.HEARTBEAT_INTERVAL,
            exact=True,
        )
        self._publishing = not start_paused
        self._running = True
        # Upstream heartbeats whenever idle for an interval, publishing or not.
        self._emitter.set_idle(self._publishing)

    def publish(self, metrics) -> None:
        """Queues ``metrics`` (its wall time as measured by the scheduler); never blocks."""
        if self._running and self._publishing:
            self._emitter.publish(metrics)

    def resume(self) -> None:
        """Enable live publishing after startup self-benchmarking finishes."""
        self._publishing = True
        self._emitter.set_idle(True)

    def stats(self) -> dict:
        """The emitter's counters (published, dropped by reason, ...)."""
        return self._emitter.stats()

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        self._publishing = True
        self._final = self._emitter.shutdown(self.SHUTDOWN_TIMEOUT)
