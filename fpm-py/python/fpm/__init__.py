"""fpm: Forward Pass Metrics for LLM engines, backed by the Rust emitter.

``fpm.Emitter`` publishes one ForwardPassMetrics per scheduler iteration over ZeroMQ, timed on
the GPU with CUDA events on the engine's own streams (or the CPU clock, labelled, without
CUDA). ``fpm.sglang`` and ``fpm.vllm`` hold drop-in replacements for the engines'
``_FpmPublisherThread``: an engine switches by changing one import.
"""

from fpm._native import Emitter, Subscriber, __version__, drop_reasons

__all__ = ["Emitter", "Subscriber", "drop_reasons", "__version__"]
