//! `fpm._native`: the Rust emitter for Python engines (SGLang, vLLM). The pure-Python part of
//! the package (`fpm/__init__.py`, `fpm/sglang.py`, `fpm/vllm.py`) wraps it; see the README.
//!
//! Everything an engine's scheduler thread calls returns without waiting: `submit` and
//! `publish` hand the iteration to the emitter's own thread (a bounded queue; when it is full
//! the iteration is dropped and counted). Only `Emitter(...)` (binding the socket) and
//! `shutdown` wait, and they release the GIL while they do.

mod planner;

use std::sync::Mutex;
use std::time::Duration;

use fpm_emitter::{
    ClockChoice, DropReason, EmitterConfig, EmitterError, EmitterStats, Endpoint, StreamHandle,
};
use fpm_schema::{QueuedRequestMetrics, ScheduledRequestMetrics};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

fn emitter_error(e: EmitterError) -> PyErr {
    // The whole chain, one line.
    let mut text = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        text = format!("{text}: {c}");
        cur = c.source();
    }
    match e {
        EmitterError::Config(_) => PyValueError::new_err(text),
        EmitterError::Bind { .. } | EmitterError::InUse { .. } | EmitterError::Spawn(_) => {
            PyOSError::new_err(text)
        }
        _ => PyRuntimeError::new_err(text),
    }
}

/// One field of a struct given as a msgspec struct (attributes), a dict, or `None` (0).
/// `name` is interned once per process (`intern!`), so a lookup creates no string.
fn field<'py>(
    obj: &Bound<'py, PyAny>,
    name: &Bound<'py, PyString>,
    what: &str,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if obj.is_none() {
        return Ok(None);
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        return d.get_item(name);
    }
    match obj.getattr(name) {
        Ok(v) => Ok(Some(v)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{what} must be a {what} struct, a dict or None; {} has no field {name}",
            obj.get_type().name()?
        ))),
    }
}

fn int_of(v: Option<Bound<'_, PyAny>>, name: &str) -> PyResult<i64> {
    match v {
        None => Ok(0),
        Some(v) => v.extract::<i64>().map_err(|_| {
            PyTypeError::new_err(format!("{name} must be an int (got {})", type_name(&v)))
        }),
    }
}

fn float_of(v: Option<Bound<'_, PyAny>>, name: &str) -> PyResult<f64> {
    match v {
        None => Ok(0.0),
        Some(v) => v.extract::<f64>().map_err(|_| {
            PyTypeError::new_err(format!("{name} must be a float (got {})", type_name(&v)))
        }),
    }
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Reads `$ty { field: int|float, ... }` from a struct, a dict or `None`; the names are
/// interned literals, checked against the upstream structs by the Python tests.
macro_rules! read_struct {
    ($obj:expr, $ty:ident, $what:literal, { $($f:ident: $kind:ident),* $(,)? }) => {{
        let obj = $obj;
        let py = obj.py();
        Ok($ty {
            $($f: read_struct!(@$kind field(obj, pyo3::intern!(py, stringify!($f)), $what)?, stringify!($f))?,)*
        })
    }};
    (@int $v:expr, $name:expr) => { int_of($v, $name) };
    (@float $v:expr, $name:expr) => { float_of($v, $name) };
}

fn scheduled_of(obj: &Bound<'_, PyAny>) -> PyResult<ScheduledRequestMetrics> {
    read_struct!(obj, ScheduledRequestMetrics, "ScheduledRequestMetrics", {
        num_prefill_requests: int,
        sum_prefill_tokens: int,
        var_prefill_length: float,
        sum_prefill_kv_tokens: int,
        num_decode_requests: int,
        sum_decode_kv_tokens: int,
        var_decode_kv_tokens: float,
    })
}

fn queued_of(obj: &Bound<'_, PyAny>) -> PyResult<QueuedRequestMetrics> {
    read_struct!(obj, QueuedRequestMetrics, "QueuedRequestMetrics", {
        num_prefill_requests: int,
        sum_prefill_tokens: int,
        var_prefill_length: float,
        num_decode_requests: int,
        sum_decode_kv_tokens: int,
        var_decode_kv_tokens: float,
    })
}

fn stats_dict<'py>(py: Python<'py>, s: &EmitterStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("clock", format!("{:?}", s.clock).to_lowercase())?;
    d.set_item("submitted", s.submitted)?;
    d.set_item("published", s.published)?;
    d.set_item("heartbeats", s.heartbeats)?;
    d.set_item("heartbeats_dropped", s.heartbeats_dropped)?;
    d.set_item("lost_with_subscribers", s.lost_with_subscribers)?;
    d.set_item("pending", s.pending_timings)?;
    let dropped = PyDict::new(py);
    for (reason, n) in s.dropped.by_reason() {
        dropped.set_item(reason, n)?;
    }
    d.set_item("dropped", dropped)?;
    Ok(d)
}

/// The emitter: one ZeroMQ PUB per (engine, dp rank), iterations timed on the GPU (CUDA
/// events on the engine's streams) or, without CUDA, by the CPU clock.
#[pyclass(name = "Emitter", module = "fpm._native", frozen)]
struct PyEmitter {
    inner: Mutex<Option<fpm_emitter::Emitter>>,
    endpoint: String,
}

impl PyEmitter {
    fn with<R>(&self, f: impl FnOnce(&mut fpm_emitter::Emitter) -> R) -> PyResult<R> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(e) => Ok(f(e)),
            None => Err(PyRuntimeError::new_err("the emitter was shut down")),
        }
    }

    /// For `submit`/`publish`, which an engine may still call while another thread shuts the
    /// emitter down: after shutdown they return `"shutdown"` rather than raise into the
    /// scheduler loop.
    fn hot(
        &self,
        f: impl FnOnce(&mut fpm_emitter::Emitter) -> Option<&'static str>,
    ) -> Option<&'static str> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            Some(e) => f(e),
            None => Some("shutdown"),
        }
    }
}

impl Drop for PyEmitter {
    /// An emitter collected without `shutdown()` stops on a thread of its own, so that the
    /// interpreter (which holds the GIL here) does not wait for it.
    fn drop(&mut self) {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(e) = taken {
            let _ = std::thread::Builder::new()
                .name("fpm-emitter-drop".into())
                .spawn(move || drop(e));
        }
    }
}

fn stream(handle: u64) -> StreamHandle {
    // SAFETY: the caller passes a CUDA stream handle of this process (e.g.
    // `torch.cuda.current_stream().cuda_stream`), 0 for the default stream; with the CPU
    // clock the handle is only compared.
    unsafe { StreamHandle::from_raw(handle) }
}

fn reason_str(r: Option<DropReason>) -> Option<&'static str> {
    r.map(|r| r.as_str())
}

#[pymethods]
impl PyEmitter {
    /// `Emitter(endpoint, worker_id, dp_rank=0, *, clock="auto", queue_size=None,
    /// send_hwm=None, heartbeat_interval=None, cuda_device=None, exact=False)`.
    ///
    /// `endpoint` as `fpm sim --endpoint`: `ipc://PATH` binds `PATH.{dp_rank}` (SGLang's
    /// layout), `tcp://HOST:PORT` or a bare port binds port + dp_rank (Dynamo's vLLM layout);
    /// with `exact=True` exactly this address. `clock`: `auto` (CUDA when available, else
    /// the CPU clock, logged), `cuda` (an error without it) or `cpu`.
    #[new]
    #[pyo3(signature = (endpoint, worker_id, dp_rank=0, *, clock="auto", queue_size=None, send_hwm=None, heartbeat_interval=None, cuda_device=None, exact=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoint: &str,
        worker_id: &str,
        dp_rank: i64,
        clock: &str,
        queue_size: Option<i64>,
        send_hwm: Option<i32>,
        heartbeat_interval: Option<f64>,
        cuda_device: Option<u32>,
        exact: bool,
    ) -> PyResult<Self> {
        let dp_rank = u32::try_from(dp_rank).map_err(|_| {
            PyValueError::new_err(format!("dp_rank must be 0..=4294967295, got {dp_rank}"))
        })?;
        let ep = if exact {
            Endpoint::Exact(endpoint.to_owned())
        } else {
            Endpoint::parse(endpoint).map_err(emitter_error)?
        };
        let clock = match clock {
            "auto" => ClockChoice::Auto,
            "cuda" => ClockChoice::Cuda,
            "cpu" => ClockChoice::Cpu,
            other => {
                return Err(PyValueError::new_err(format!(
                    "clock must be 'auto', 'cuda' or 'cpu', got {other:?}"
                )))
            }
        };
        let mut config = EmitterConfig::new(ep, worker_id, dp_rank).with_clock(clock);
        if let Some(n) = queue_size {
            let n = usize::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                PyValueError::new_err(format!("queue_size must be at least 1, got {n}"))
            })?;
            config = config.with_queue_capacity(n);
        }
        if let Some(h) = send_hwm {
            if h < 0 {
                return Err(PyValueError::new_err(format!(
                    "send_hwm must be 0 (no limit) or more, got {h}"
                )));
            }
            config.send_hwm = h;
        }
        if let Some(s) = heartbeat_interval {
            let d = Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "heartbeat_interval must be a positive number of seconds, got {s}"
                    ))
                })?;
            config = config.with_heartbeat_interval(d);
        }
        config.cuda_device = cuda_device;
        let e = py
            .detach(move || fpm_emitter::Emitter::start(config))
            .map_err(emitter_error)?;
        let endpoint = e.endpoint().to_owned();
        Ok(PyEmitter {
            inner: Mutex::new(Some(e)),
            endpoint,
        })
    }

    /// The address bound.
    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `cuda` or `cpu`: what times the iterations.
    #[getter]
    fn clock(&self) -> PyResult<String> {
        self.with(|e| format!("{:?}", e.clock_kind()).to_lowercase())
    }

    /// Starts an iteration (optional: the first `segment_start` or `submit` does it).
    fn begin_iteration(&self) -> PyResult<()> {
        self.with(|e| e.begin_iteration())
    }

    /// Marks the start of a forward segment on `stream` (a raw CUDA stream handle, e.g.
    /// `torch.cuda.current_stream().cuda_stream`; 0 for the default stream). With the CUDA
    /// clock the handle goes to the driver as is: it must be a live stream of this process
    /// (a made-up number is undefined behaviour there, as in any CUDA call).
    fn segment_start(&self, stream: u64) -> PyResult<()> {
        self.with(|e| e.segment_start(self::stream(stream)))
    }

    /// Marks the end of the segment on `stream`.
    fn segment_end(&self, stream: u64) -> PyResult<()> {
        self.with(|e| e.segment_end(self::stream(stream)))
    }

    /// Hands the iteration over: `scheduled` and `queued` are the upstream msgspec structs
    /// (or anything with those attributes), dicts of their fields, or `None` (all zero).
    /// Never waits. Returns `None` when queued for publication, or the drop reason (counted).
    #[pyo3(signature = (scheduled=None, queued=None))]
    fn submit(
        &self,
        scheduled: Option<&Bound<'_, PyAny>>,
        queued: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<&'static str>> {
        let s = match scheduled {
            Some(s) => scheduled_of(s)?,
            None => ScheduledRequestMetrics::default(),
        };
        let q = match queued {
            Some(q) => queued_of(q)?,
            None => QueuedRequestMetrics::default(),
        };
        Ok(self.hot(|e| reason_str(e.submit(s, q))))
    }

    /// Hands over a finished `ForwardPassMetrics` (SGLang's or Dynamo's msgspec struct, or
    /// anything with `wall_time`, `scheduled_requests` and `queued_requests`): its wall time
    /// is published as given; worker id, dp rank and counter are the emitter's. Never waits.
    fn publish(&self, metrics: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
        let py = metrics.py();
        let w = "ForwardPassMetrics";
        let wall = float_of(
            field(metrics, pyo3::intern!(py, "wall_time"), w)?,
            "wall_time",
        )?;
        let s = match field(metrics, pyo3::intern!(py, "scheduled_requests"), w)? {
            Some(s) => scheduled_of(&s)?,
            None => ScheduledRequestMetrics::default(),
        };
        let q = match field(metrics, pyo3::intern!(py, "queued_requests"), w)? {
            Some(q) => queued_of(&q)?,
            None => QueuedRequestMetrics::default(),
        };
        Ok(self.hot(|e| reason_str(e.submit_measured(wall, s, q))))
    }

    /// Whether the engine is idle: while idle and nothing is published, an all-zero
    /// heartbeat goes out every heartbeat interval.
    fn set_idle(&self, idle: bool) -> PyResult<()> {
        self.with(|e| e.set_idle(idle))
    }

    /// The counters: submitted, published, heartbeats, pending, dropped (by reason).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(|e| e.stats())?;
        stats_dict(py, &s)
    }

    /// Publishes what completes within `timeout` seconds, closes the socket and returns the
    /// final counters (what did not make it is counted as dropped). A second call raises
    /// `RuntimeError`.
    #[pyo3(signature = (timeout=1.0))]
    fn shutdown<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyDict>> {
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| {
            PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds, got {timeout}"
            ))
        })?;
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(e) = taken else {
            return Err(PyRuntimeError::new_err("the emitter was already shut down"));
        };
        let stats = py.detach(move || e.shutdown(timeout));
        stats_dict(py, &stats)
    }

    fn __repr__(&self) -> String {
        format!("fpm.Emitter(endpoint={:?})", self.endpoint)
    }
}

/// The fields `submit`/`publish` read, per struct (checked against the upstream structs'
/// `__struct_fields__` by the tests).
#[pyfunction]
fn field_names() -> Vec<(&'static str, Vec<&'static str>)> {
    let names =
        |pairs: &'static [(&'static str, &'static str)]| pairs.iter().map(|(n, _)| *n).collect();
    fpm_schema::SCHEMA
        .iter()
        .map(|(ty, fields)| (*ty, names(fields)))
        .collect()
}

/// The drop reasons, in the order `stats()["dropped"]` lists them.
#[pyfunction]
fn drop_reasons<'py>(py: Python<'py>) -> Vec<Bound<'py, PyString>> {
    DropReason::ALL
        .iter()
        .map(|r| PyString::new(py, r.as_str()))
        .collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEmitter>()?;
    m.add_function(wrap_pyfunction!(drop_reasons, m)?)?;
    m.add_function(wrap_pyfunction!(field_names, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    planner::register(m)?;
    Ok(())
}
