"""Drop-in for Dynamo 1.6.1's vLLM ``_FpmPublisherThread``
(``dynamo/vllm/instrumented_scheduler.py``): same constructor (``start_paused`` included) and
methods, backed by the Rust emitter.

Switch with one import::

    from fpm.vllm import _FpmPublisherThread

As upstream, heartbeats go out whenever nothing was published for a heartbeat interval, and
``publish`` is ignored while paused (before ``resume()``).
"""

from __future__ import annotations

from fpm._publisher import Publisher, _ignore


class _FpmPublisherThread(Publisher):
    """Publishes what Dynamo's instrumented vLLM scheduler hands it."""

    def __init__(
        self,
        endpoint: str,
        worker_id: str,
        dp_rank: int,
        max_queue_size: int = 10_000,
        start_paused: bool = False,
    ) -> None:
        super().__init__(endpoint, worker_id, dp_rank, max_queue_size)
        if start_paused:
            self.publish = _ignore
        else:
            self.resume()

    def resume(self) -> None:
        """Enable live publishing after startup self-benchmarking finishes."""
        if self._running:
            self.publish = self._emitter.publish
            # Upstream heartbeats whenever nothing went out for an interval.
            self._emitter.set_idle(True)
