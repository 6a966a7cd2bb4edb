"""Drop-in for SGLang 0.5.23's ``_FpmPublisherThread``
(``sglang/srt/observability/forward_pass_metrics.py``): same constructor and methods, backed by
the Rust emitter (no Python thread, no GIL held while publishing).

Switch with one import::

    from fpm.sglang import _FpmPublisherThread

Differences from upstream, all in the direction of counting what upstream loses silently:
a full queue, a send that would block and a message published before any subscriber are
counted by reason in ``stats()``; the counter frame and ``counter_id`` are the emitter's, as
upstream's are its own.
"""

from __future__ import annotations

from fpm._publisher import Publisher


class _FpmPublisherThread(Publisher):
    """Publishes what SGLang's scheduler hands it; heartbeats only while ``set_idle(True)``."""

    def set_idle(self, idle: bool) -> None:
        """Set whether the scheduler permits idle heartbeats."""
        self._emitter.set_idle(idle)
