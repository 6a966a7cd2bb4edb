"""Dynamo 1.6.1's planner regression models, backed by the Rust models of ``fpm-subscriber``.

Same constructors, methods, properties and results as ``PrefillRegressionModel``,
``DecodeRegressionModel`` and ``AggRegressionModel`` of
``dynamo.planner.core.perf_model`` (``ai-dynamo==1.6.1``; ``fpm-py/tests/test_planner.py``
runs both on the same random sequences). A planner switches by changing one import::

    from fpm.planner import PrefillRegressionModel
    # was: from dynamo.planner.core.perf_model import PrefillRegressionModel

``add_observation`` takes Dynamo's or SGLang's ``ForwardPassMetrics`` msgspec struct, a dict of
its fields, or anything with ``wall_time`` and ``scheduled_requests`` attributes. Where
upstream's scikit-learn fit raises ``ValueError`` (a NaN or infinite wall time retained), so
do these.

Differences, all on input upstream does not expect: arguments documented as ``int`` must be
ints (``TypeError`` naming the argument; upstream would also compute with a float), numbers
must be numbers; configurations upstream cannot run (``max_num_fpm_samples`` < 1, at most
2**20 here, ``bucket_count`` < 1, ``min_observations`` < 0) raise ``ValueError``;
``max_num_fpm_samples`` and ``min_observations`` are read-only; upstream's private state
(``_model``, ``_buckets``, ...) is not there. Upstream's exceptions on non-finite query
arguments (``ValueError`` from scikit-learn, ``OverflowError``) are raised here too.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable, Optional

from fpm import _native

__all__ = ["PrefillRegressionModel", "DecodeRegressionModel", "AggRegressionModel"]

_I64 = (-(2**63), 2**63 - 1)


def _int(name: str, v: Any) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if not _I64[0] <= i <= _I64[1]:
        raise OverflowError(f"{name} must fit in 64 bits, got {i}")
    return i


def _opt_int(name: str, v: Any) -> Optional[int]:
    return None if v is None else _int(name, v)


def _float(name: str, v: Any) -> float:
    if not isinstance(v, (str, bytes, bytearray)):
        try:
            return float(v)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name} must be a number, got {type(v).__name__}")


def _opt_float(name: str, v: Any) -> Optional[float]:
    return None if v is None else _float(name, v)


def _features_not_finite(name: str, v: float) -> ValueError:
    # Upstream hands the value to scikit-learn's predict, which refuses NaN and infinity.
    return ValueError(f"{name} must be finite, got {v} (Dynamo's model raises ValueError here too)")


class _RegressionModel:
    """What the three models share (upstream's ``_BaseRegressionModel``)."""

    _native_class: Any = None

    def __init__(self, max_num_fpm_samples: int, min_observations: int = 5, bucket_count: int = 16):
        self._rust = self._native_class(
            _int("max_num_fpm_samples", max_num_fpm_samples),
            _int("min_observations", min_observations),
            _int("bucket_count", bucket_count),
        )

    def add_observation(self, fpm: Any) -> None:
        """Feeds one ForwardPassMetrics: the moving averages always, a sample (for the
        regression) unless it is an idle heartbeat (``wall_time == 0``)."""
        self._rust.add_observation(fpm)

    def load_benchmark_fpms(self, fpms: Iterable[Any]) -> None:
        """Bootstrap regression from pre-deployment benchmark FPMs."""
        self._rust.load_benchmark_fpms(fpms)

    def has_sufficient_data(self) -> bool:
        return self._rust.has_sufficient_data()

    @property
    def num_observations(self) -> int:
        return self._rust.num_observations

    @property
    def max_num_fpm_samples(self) -> int:
        return self._rust.max_num_fpm_samples

    @property
    def min_observations(self) -> int:
        return self._rust.min_observations

    def __repr__(self) -> str:
        return f"fpm.planner.{type(self).__name__}: {self._rust!r}"


class PrefillRegressionModel(_RegressionModel):
    """Predict per-iteration wall time from scheduled prefill tokens."""

    _native_class = _native.PrefillModel

    @property
    def avg_isl(self) -> float:
        return self._rust.avg_isl

    def estimate_next_ttft(
        self,
        queued_prefill_tokens: int,
        max_num_batched_tokens: int,
        kv_hit_rate: Optional[float] = None,
    ) -> Optional[float]:
        """Estimated TTFT in seconds for the next request, or None if the model is not ready."""
        return self._rust.estimate_next_ttft(
            _int("queued_prefill_tokens", queued_prefill_tokens),
            _int("max_num_batched_tokens", max_num_batched_tokens),
            _opt_float("kv_hit_rate", kv_hit_rate),
        )

    def find_best_engine_prefill_rps(
        self,
        ttft_sla: float,
        isl: float,
        max_num_batched_tokens: Optional[int] = None,
    ) -> tuple[float, float]:
        """``(engine_rps, actual_ttft_ms)``; ``(0.0, 0.0)`` when not fitted or ``isl <= 0``."""
        isl, mbt = _float("isl", isl), _opt_int("max_num_batched_tokens", max_num_batched_tokens)
        if (math.isnan(isl) or isl == math.inf) and self._rust.ready():
            if isl == math.inf and mbt and mbt > 0:
                raise OverflowError("isl must be finite, got inf (Dynamo's model raises OverflowError here too)")
            raise _features_not_finite("isl", isl)
        return self._rust.find_best_engine_prefill_rps(_float("ttft_sla", ttft_sla), isl, mbt)


class DecodeRegressionModel(_RegressionModel):
    """Predict per-iteration wall time from decode batch composition
    (``[num_decode_requests, sum_decode_kv_tokens]``)."""

    _native_class = _native.DecodeModel

    @property
    def avg_decode_length(self) -> float:
        return self._rust.avg_decode_length

    def estimate_next_itl(self, scheduled_decode_kv: int, queued_decode_kv: int) -> Optional[float]:
        """Estimated next decode iteration time in seconds, or None if not ready."""
        return self._rust.estimate_next_itl(
            _int("scheduled_decode_kv", scheduled_decode_kv),
            _int("queued_decode_kv", queued_decode_kv),
        )

    def find_best_engine_decode_rps(
        self,
        itl: float,
        context_length: float,
        osl: float,
        max_kv_tokens: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        accept_length: float = 1.0,
    ) -> tuple[float, float]:
        """``(engine_rps, actual_itl_ms)``; ``(0.0, 0.0)`` when not fitted or on
        non-positive ``itl``, ``context_length`` or ``osl``."""
        itl, ctx, osl = _float("itl", itl), _float("context_length", context_length), _float("osl", osl)
        if (math.isnan(ctx) or ctx == math.inf) and not (osl <= 0 or itl <= 0) and self._rust.ready():
            raise _features_not_finite("context_length", ctx)
        return self._rust.find_best_engine_decode_rps(
            itl,
            ctx,
            osl,
            _opt_int("max_kv_tokens", max_kv_tokens),
            _opt_int("max_num_seqs", max_num_seqs),
            _float("accept_length", accept_length),
        )


class AggRegressionModel(_RegressionModel):
    """2D regression for aggregated (chunked prefill + decode) engines
    (``[sum_prefill_tokens, sum_decode_kv_tokens]``)."""

    _native_class = _native.AggModel

    @property
    def avg_isl(self) -> float:
        return self._rust.avg_isl

    @property
    def avg_decode_length(self) -> float:
        return self._rust.avg_decode_length

    @property
    def avg_prefill_tokens(self) -> float:
        return self._rust.avg_prefill_tokens

    def estimate_next_ttft(
        self,
        queued_prefill_tokens: int,
        max_num_batched_tokens: int,
        current_decode_kv: int,
        kv_hit_rate: Optional[float] = None,
    ) -> Optional[float]:
        """Estimated TTFT in seconds with piggybacked decode, or None if not ready."""
        return self._rust.estimate_next_ttft(
            _int("queued_prefill_tokens", queued_prefill_tokens),
            _int("max_num_batched_tokens", max_num_batched_tokens),
            _int("current_decode_kv", current_decode_kv),
            _opt_float("kv_hit_rate", kv_hit_rate),
        )

    def estimate_next_itl(self, scheduled_decode_kv: int, queued_decode_kv: int) -> Optional[float]:
        """Estimated decode iteration time in seconds with piggybacked prefill, or None."""
        return self._rust.estimate_next_itl(
            _int("scheduled_decode_kv", scheduled_decode_kv),
            _int("queued_decode_kv", queued_decode_kv),
        )

    def find_best_engine_agg_rps(
        self,
        isl: float,
        osl: float,
        max_num_batched_tokens: int,
        ttft_sla: float,
        itl_sla: float,
        max_kv_tokens: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        kv_hit_rate: Optional[float] = None,
        accept_length: float = 1.0,
    ) -> tuple[float, float, float]:
        """``(engine_rps, ttft_ms, itl_ms)`` at the largest batch meeting both SLAs (ms);
        ``(0.0, 0.0, 0.0)`` when not fitted or on non-positive ``isl``, ``osl`` or
        ``max_num_batched_tokens``."""
        isl, osl = _float("isl", isl), _float("osl", osl)
        mbt = _int("max_num_batched_tokens", max_num_batched_tokens)
        if not (isl <= 0 or osl <= 0 or mbt <= 0) and self._rust.ready():
            for name, v in (("isl", isl), ("osl", osl)):
                if math.isnan(v) or v == math.inf:
                    raise _features_not_finite(name, v)
        return self._rust.find_best_engine_agg_rps(
            isl,
            osl,
            mbt,
            _float("ttft_sla", ttft_sla),
            _float("itl_sla", itl_sla),
            _opt_int("max_kv_tokens", max_kv_tokens),
            _opt_int("max_num_seqs", max_num_seqs),
            _opt_float("kv_hit_rate", kv_hit_rate),
            _float("accept_length", accept_length),
        )
