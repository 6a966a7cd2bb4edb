//! The planner side (`fpm-subscriber`) for Python: Dynamo 1.6.1's three planner regression
//! models (`PrefillModel`, `DecodeModel`, `AggModel`, wrapped by `fpm/planner.py` in classes
//! with upstream's names, signatures and argument checks), and `fpm.Subscriber`, a NATS
//! subscriber that tracks every engine stream.
//!
//! The models are `fpm_subscriber::planner`'s, which the contract tests hold to Dynamo's
//! `dynamo/planner/core/perf_model/{prefill,decode,agg}.py`; the Python tests compare these
//! classes with Dynamo's own on random sequences. Where upstream's scikit-learn fit raises
//! `ValueError` (a NaN or infinite wall time retained, or `min_observations=0` with no
//! sample), these raise `ValueError` too; configurations upstream cannot run
//! (`max_num_fpm_samples < 1`, `bucket_count < 1`, `min_observations < 0`) are refused by
//! the constructor.

use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use fpm_schema::{ForwardPassMetrics, QueuedRequestMetrics, ScheduledRequestMetrics};
use fpm_subscriber::planner::{AggModel, DecodeModel, FitError, ModelConfig, PrefillModel};
use fpm_subscriber::{
    LossCounts, ScopeFilter, StreamState, SubjectFilter, Subscriber, SubscriberConfig,
    SubscriberStats,
};
use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use tokio::sync::{mpsc, oneshot};

use crate::{field, float_of, scheduled_of};

/// Largest `max_num_fpm_samples` accepted: the moving averages reserve their window up front.
const MAX_SAMPLES_LIMIT: i64 = 1 << 20;

fn model_config(
    max_num_fpm_samples: i64,
    min_observations: i64,
    bucket_count: i64,
) -> PyResult<ModelConfig> {
    if !(1..=MAX_SAMPLES_LIMIT).contains(&max_num_fpm_samples) {
        return Err(PyValueError::new_err(format!(
            "max_num_fpm_samples must be 1..={MAX_SAMPLES_LIMIT}, got {max_num_fpm_samples}"
        )));
    }
    if min_observations < 0 {
        return Err(PyValueError::new_err(format!(
            "min_observations must be >= 0, got {min_observations}"
        )));
    }
    if bucket_count < 1 {
        return Err(PyValueError::new_err(format!(
            "bucket_count must be >= 1, got {bucket_count}"
        )));
    }
    Ok(ModelConfig {
        max_samples: max_num_fpm_samples as usize,
        bucket_size: bucket_count as usize,
        min_observations: min_observations as usize,
    })
}

/// What a model reads of a `ForwardPassMetrics` (Dynamo's or SGLang's msgspec struct, a dict,
/// or anything with `wall_time` and `scheduled_requests`): the wall time and the scheduled
/// requests.
fn fpm_of(obj: &Bound<'_, PyAny>) -> PyResult<ForwardPassMetrics> {
    if obj.is_none() {
        return Err(PyTypeError::new_err(
            "add_observation needs a ForwardPassMetrics, got None",
        ));
    }
    let py = obj.py();
    let w = "ForwardPassMetrics";
    let wall_time = float_of(field(obj, pyo3::intern!(py, "wall_time"), w)?, "wall_time")?;
    let scheduled_requests = match field(obj, pyo3::intern!(py, "scheduled_requests"), w)? {
        Some(s) => scheduled_of(&s)?,
        None => ScheduledRequestMetrics::default(),
    };
    Ok(ForwardPassMetrics {
        wall_time,
        scheduled_requests,
        ..Default::default()
    })
}

/// Upstream's `_ensure_fitted()`, with scikit-learn's `ValueError`s where it raises them.
fn ensure_fitted<T>(fit: Result<T, FitError>) -> PyResult<()> {
    match fit {
        Err(e @ (FitError::NonFinite | FitError::NoSamples)) => Err(PyValueError::new_err(
            format!("cannot fit the model: {e} (Dynamo's scikit-learn fit raises here too)"),
        )),
        _ => Ok(()),
    }
}

/// The class, its constructor and what the three models share: `add_observation`,
/// `load_benchmark_fpms`, `has_sufficient_data`, `num_observations`, `max_num_fpm_samples`,
/// `min_observations`; `$extra` holds the model's own methods.
macro_rules! model_class {
    ($ty:ident, $name:literal, $model:ty, $doc:literal, { $($extra:tt)* }) => {
        #[doc = $doc]
        #[pyclass(name = $name, module = "fpm._native", frozen)]
        pub(crate) struct $ty {
            inner: Mutex<$model>,
            max_num_fpm_samples: i64,
            min_observations: i64,
            bucket_count: i64,
        }

        impl $ty {
            fn lock(&self) -> MutexGuard<'_, $model> {
                self.inner.lock().unwrap_or_else(|e| e.into_inner())
            }
        }

        #[pymethods]
        impl $ty {
            #[new]
            #[pyo3(signature = (max_num_fpm_samples, min_observations=5, bucket_count=16))]
            fn new(
                max_num_fpm_samples: i64,
                min_observations: i64,
                bucket_count: i64,
            ) -> PyResult<Self> {
                let config = model_config(max_num_fpm_samples, min_observations, bucket_count)?;
                let model =
                    <$model>::new(&config).map_err(|e| PyValueError::new_err(e.to_string()))?;
                Ok($ty {
                    inner: Mutex::new(model),
                    max_num_fpm_samples,
                    min_observations,
                    bucket_count,
                })
            }

            /// Feeds one ForwardPassMetrics: the moving averages always, a sample unless it
            /// is an idle heartbeat (`wall_time == 0`).
            fn add_observation(&self, fpm: &Bound<'_, PyAny>) -> PyResult<()> {
                let fpm = fpm_of(fpm)?;
                self.lock().observe(&fpm);
                Ok(())
            }

            /// `add_observation` for each of `fpms` (bootstrap from benchmark FPMs).
            fn load_benchmark_fpms(&self, fpms: &Bound<'_, PyAny>) -> PyResult<()> {
                for fpm in fpms.try_iter()? {
                    let fpm = fpm_of(&fpm?)?;
                    self.lock().observe(&fpm);
                }
                Ok(())
            }

            /// Whether the model has a usable fit (upstream's `_ensure_fitted()`);
            /// `ValueError` where upstream's fit raises.
            fn ready(&self) -> PyResult<bool> {
                let mut m = self.lock();
                ensure_fitted(m.fit())?;
                Ok(m.fit().is_ok())
            }

            /// At least `min_observations` samples retained.
            fn has_sufficient_data(&self) -> bool {
                self.lock().has_sufficient_data()
            }

            /// Samples retained.
            #[getter]
            fn num_observations(&self) -> usize {
                self.lock().num_observations()
            }

            #[getter]
            fn max_num_fpm_samples(&self) -> i64 {
                self.max_num_fpm_samples
            }

            #[getter]
            fn min_observations(&self) -> i64 {
                self.min_observations
            }

            fn __repr__(&self) -> String {
                format!(
                    "fpm._native.{}(max_num_fpm_samples={}, min_observations={}, bucket_count={}) with {} observations",
                    $name,
                    self.max_num_fpm_samples,
                    self.min_observations,
                    self.bucket_count,
                    self.lock().num_observations()
                )
            }

            $($extra)*
        }
    };
}

model_class!(
    PyPrefillModel,
    "PrefillModel",
    PrefillModel,
    "Dynamo 1.6.1's `PrefillRegressionModel`: `wall_time ~ sum_prefill_tokens`.",
    {
        /// Moving average of scheduled prefill tokens per prefill request.
        #[getter]
        fn avg_isl(&self) -> f64 {
            self.lock().avg_isl()
        }

        /// Estimated TTFT in seconds of the next request, `None` while the model is not ready.
        #[pyo3(signature = (queued_prefill_tokens, max_num_batched_tokens, kv_hit_rate=None))]
        fn estimate_next_ttft(
            &self,
            queued_prefill_tokens: i64,
            max_num_batched_tokens: i64,
            kv_hit_rate: Option<f64>,
        ) -> PyResult<Option<f64>> {
            let mut m = self.lock();
            ensure_fitted(m.fit())?;
            Ok(m.estimate_next_ttft(queued_prefill_tokens, max_num_batched_tokens, kv_hit_rate))
        }

        /// `(engine_rps, actual_ttft_ms)`; `(0.0, 0.0)` while not ready or for `isl <= 0`.
        #[pyo3(signature = (ttft_sla, isl, max_num_batched_tokens=None))]
        fn find_best_engine_prefill_rps(
            &self,
            ttft_sla: f64,
            isl: f64,
            max_num_batched_tokens: Option<i64>,
        ) -> PyResult<(f64, f64)> {
            let mut m = self.lock();
            ensure_fitted(m.fit())?;
            Ok(m.find_best_engine_prefill_rps(ttft_sla, isl, max_num_batched_tokens))
        }
    }
);

model_class!(PyDecodeModel, "DecodeModel", DecodeModel,
    "Dynamo 1.6.1's `DecodeRegressionModel`: `wall_time ~ num_decode_requests + sum_decode_kv_tokens`.", {
    /// Moving average of decode KV tokens per decode request.
    #[getter]
    fn avg_decode_length(&self) -> f64 {
        self.lock().avg_decode_length()
    }

    /// Estimated next decode iteration time in seconds, `None` while not ready.
    fn estimate_next_itl(
        &self,
        scheduled_decode_kv: i64,
        queued_decode_kv: i64,
    ) -> PyResult<Option<f64>> {
        let mut m = self.lock();
        ensure_fitted(m.fit())?;
        Ok(m.estimate_next_itl(scheduled_decode_kv, queued_decode_kv))
    }

    /// `(engine_rps, actual_itl_ms)`; `(0.0, 0.0)` while not ready or on non-positive input.
    #[pyo3(signature = (itl, context_length, osl, max_kv_tokens=None, max_num_seqs=None, accept_length=1.0))]
    fn find_best_engine_decode_rps(
        &self,
        itl: f64,
        context_length: f64,
        osl: f64,
        max_kv_tokens: Option<i64>,
        max_num_seqs: Option<i64>,
        accept_length: f64,
    ) -> PyResult<(f64, f64)> {
        let mut m = self.lock();
        ensure_fitted(m.fit())?;
        Ok(m.find_best_engine_decode_rps(
            itl,
            context_length,
            osl,
            max_kv_tokens,
            max_num_seqs,
            accept_length,
        ))
    }
});

model_class!(
    PyAggModel,
    "AggModel",
    AggModel,
    "Dynamo 1.6.1's `AggRegressionModel`: `wall_time ~ sum_prefill_tokens + sum_decode_kv_tokens`.",
    {
        /// Moving average of scheduled prefill tokens per prefill request.
        #[getter]
        fn avg_isl(&self) -> f64 {
            self.lock().avg_isl()
        }

        /// Moving average of decode KV tokens per decode request.
        #[getter]
        fn avg_decode_length(&self) -> f64 {
            self.lock().avg_decode_length()
        }

        /// Moving average of scheduled prefill tokens per iteration.
        #[getter]
        fn avg_prefill_tokens(&self) -> f64 {
            self.lock().avg_prefill_tokens()
        }

        /// Estimated TTFT in seconds with piggybacked decode, `None` while not ready.
        #[pyo3(signature = (queued_prefill_tokens, max_num_batched_tokens, current_decode_kv, kv_hit_rate=None))]
        fn estimate_next_ttft(
            &self,
            queued_prefill_tokens: i64,
            max_num_batched_tokens: i64,
            current_decode_kv: i64,
            kv_hit_rate: Option<f64>,
        ) -> PyResult<Option<f64>> {
            let mut m = self.lock();
            ensure_fitted(m.fit())?;
            Ok(m.estimate_next_ttft(
                queued_prefill_tokens,
                max_num_batched_tokens,
                current_decode_kv,
                kv_hit_rate,
            ))
        }

        /// Estimated decode iteration time in seconds with piggybacked prefill, `None` while not
        /// ready.
        fn estimate_next_itl(
            &self,
            scheduled_decode_kv: i64,
            queued_decode_kv: i64,
        ) -> PyResult<Option<f64>> {
            let mut m = self.lock();
            ensure_fitted(m.fit())?;
            Ok(m.estimate_next_itl(scheduled_decode_kv, queued_decode_kv))
        }

        /// `(engine_rps, ttft_ms, itl_ms)`; `(0.0, 0.0, 0.0)` while not ready or on non-positive
        /// input.
        #[pyo3(signature = (isl, osl, max_num_batched_tokens, ttft_sla, itl_sla, max_kv_tokens=None, max_num_seqs=None, kv_hit_rate=None, accept_length=1.0))]
        #[allow(clippy::too_many_arguments)] // upstream's signature
        fn find_best_engine_agg_rps(
            &self,
            isl: f64,
            osl: f64,
            max_num_batched_tokens: i64,
            ttft_sla: f64,
            itl_sla: f64,
            max_kv_tokens: Option<i64>,
            max_num_seqs: Option<i64>,
            kv_hit_rate: Option<f64>,
            accept_length: f64,
        ) -> PyResult<(f64, f64, f64)> {
            let mut m = self.lock();
            ensure_fitted(m.fit())?;
            Ok(m.find_best_engine_agg_rps(
                isl,
                osl,
                max_num_batched_tokens,
                ttft_sla,
                itl_sla,
                max_kv_tokens,
                max_num_seqs,
                kv_hit_rate,
                accept_length,
            ))
        }
    }
);

// ---------------------------------------------------------------------------------------
// fpm.Subscriber

/// What the background thread hands back on request.
struct Snapshot {
    streams: Vec<StreamState>,
    stats: SubscriberStats,
}

/// A started subscriber: its thread (one current-thread Tokio runtime) and how to reach it.
struct Running {
    snapshots: mpsc::UnboundedSender<oneshot::Sender<Snapshot>>,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

enum State {
    New,
    Running(Running),
    Closed,
}

/// Subscribes to the FPM subject of `namespace`/`component`/`endpoint` (endpoint scope, as
/// Dynamo 1.6.1 and `fpm relay` publish; `*` for any) on `nats_url` and tracks every stream
/// `(worker_id, dp_rank)`: the latest metrics, counter gaps, duplicates, restarts, staleness.
///
/// `start()` (or `start_tracking()`, or `with`) connects and subscribes; the messages are
/// then read on a background thread with its own Tokio runtime. Every call that waits
/// releases the GIL. `close()` stops it (also when the object is collected).
#[pyclass(name = "Subscriber", module = "fpm._native", frozen)]
pub(crate) struct PySubscriber {
    url: String,
    filter: SubjectFilter,
    connect_timeout: Duration,
    state: Mutex<State>,
}

/// Why `start` failed (made into a Python exception once the GIL is back).
enum StartError {
    State(&'static str),
    Connect(String),
}

fn run(
    url: String,
    config: SubscriberConfig,
    connect_timeout: Duration,
    ready: std::sync::mpsc::SyncSender<Result<(), String>>,
    mut snapshots: mpsc::UnboundedReceiver<oneshot::Sender<Snapshot>>,
    mut stop: oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start a Tokio runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let client =
            match tokio::time::timeout(connect_timeout, async_nats::connect(url.as_str())).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let _ = ready.send(Err(format!("cannot connect to NATS at {url}: {e}")));
                    return;
                }
                Err(_) => {
                    let _ = ready.send(Err(format!(
                        "cannot connect to NATS at {url}: no answer within {connect_timeout:?}"
                    )));
                    return;
                }
            };
        let mut sub = match Subscriber::subscribe(&client, config).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot subscribe on {url}: {e}")));
                return;
            }
        };
        // The server has the subscription once `start` returns.
        if let Err(e) = client.flush().await {
            let _ = ready.send(Err(format!("cannot subscribe on {url}: {e}")));
            return;
        }
        let _ = ready.send(Ok(()));
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut ended = false;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                req = snapshots.recv() => match req {
                    Some(reply) => {
                        let _ = reply.send(Snapshot {
                            streams: sub.tracker().sorted().into_iter().cloned().collect(),
                            stats: sub.stats(),
                        });
                    }
                    None => break, // the Python object is gone
                },
                s = sub.next(), if !ended => ended = s.is_none(),
                _ = sweep.tick() => {
                    sub.sweep(fpm_subscriber::unix_now_ns());
                }
            }
        }
    });
}

fn counts_dict<'py>(py: Python<'py>, c: &LossCounts) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("received", c.received)?;
    d.set_item("iterations", c.iterations)?;
    d.set_item("heartbeats", c.heartbeats)?;
    d.set_item("gap_messages", c.gap_messages)?;
    d.set_item("gaps", c.gaps)?;
    d.set_item("duplicates", c.duplicates)?;
    d.set_item("reordered", c.reordered)?;
    d.set_item("late", c.late)?;
    d.set_item("restarts", c.restarts)?;
    d.set_item("missed_before_start", c.missed_before_start)?;
    Ok(d)
}

fn scheduled_dict<'py>(
    py: Python<'py>,
    s: &ScheduledRequestMetrics,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("num_prefill_requests", s.num_prefill_requests)?;
    d.set_item("sum_prefill_tokens", s.sum_prefill_tokens)?;
    d.set_item("var_prefill_length", s.var_prefill_length)?;
    d.set_item("sum_prefill_kv_tokens", s.sum_prefill_kv_tokens)?;
    d.set_item("num_decode_requests", s.num_decode_requests)?;
    d.set_item("sum_decode_kv_tokens", s.sum_decode_kv_tokens)?;
    d.set_item("var_decode_kv_tokens", s.var_decode_kv_tokens)?;
    Ok(d)
}

fn queued_dict<'py>(py: Python<'py>, q: &QueuedRequestMetrics) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("num_prefill_requests", q.num_prefill_requests)?;
    d.set_item("sum_prefill_tokens", q.sum_prefill_tokens)?;
    d.set_item("var_prefill_length", q.var_prefill_length)?;
    d.set_item("num_decode_requests", q.num_decode_requests)?;
    d.set_item("sum_decode_kv_tokens", q.sum_decode_kv_tokens)?;
    d.set_item("var_decode_kv_tokens", q.var_decode_kv_tokens)?;
    Ok(d)
}

/// A ForwardPassMetrics as a dict of its fields (nested dicts for the two structs).
fn metrics_dict<'py>(py: Python<'py>, m: &ForwardPassMetrics) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", m.version)?;
    d.set_item("worker_id", &m.worker_id)?;
    d.set_item("dp_rank", m.dp_rank)?;
    d.set_item("counter_id", m.counter_id)?;
    d.set_item("wall_time", m.wall_time)?;
    d.set_item(
        "scheduled_requests",
        scheduled_dict(py, &m.scheduled_requests)?,
    )?;
    d.set_item("queued_requests", queued_dict(py, &m.queued_requests)?)?;
    Ok(d)
}

fn key<'py>(py: Python<'py>, st: &StreamState) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            st.key.worker_id.as_str().into_pyobject(py)?.into_any(),
            st.key.dp_rank.into_pyobject(py)?.into_any(),
        ],
    )
}

impl PySubscriber {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the background thread for its state (waits without the GIL).
    fn snapshot(&self, py: Python<'_>) -> PyResult<Snapshot> {
        let got = py.detach(|| {
            let (tx, rx) = oneshot::channel();
            match &*self.lock() {
                State::Running(r) => r.snapshots.send(tx).map_err(|_| "its thread stopped")?,
                State::New => return Err("not started: call start() first"),
                State::Closed => return Err("it was closed"),
            }
            rx.blocking_recv().map_err(|_| "its thread stopped")
        });
        got.map_err(|why| PyRuntimeError::new_err(format!("the subscriber has no state: {why}")))
    }

    fn shut_down(&self) {
        let taken = std::mem::replace(&mut *self.lock(), State::Closed);
        if let State::Running(r) = taken {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }
}

#[pymethods]
impl PySubscriber {
    #[new]
    #[pyo3(signature = (nats_url, namespace="dynamo", component="backend", endpoint="generate", *, connect_timeout=5.0))]
    fn new(
        nats_url: &str,
        namespace: &str,
        component: &str,
        endpoint: &str,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        let filter = SubjectFilter::parse(namespace, component, endpoint, ScopeFilter::Endpoint)
            .map_err(PyValueError::new_err)?;
        if !(connect_timeout.is_finite() && connect_timeout > 0.0 && connect_timeout <= 3600.0) {
            return Err(PyValueError::new_err(format!(
                "connect_timeout must be a number of seconds in (0, 3600], got {connect_timeout}"
            )));
        }
        Ok(PySubscriber {
            url: nats_url.to_owned(),
            filter,
            connect_timeout: Duration::from_secs_f64(connect_timeout),
            state: Mutex::new(State::New),
        })
    }

    /// Connects and subscribes (waits for the server, at most `connect_timeout`); then
    /// tracks on a background thread. `ConnectionError` when NATS cannot be reached.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let r = py.detach(|| -> Result<(), StartError> {
            let mut g = self.lock();
            match *g {
                State::New => {}
                State::Running(_) => return Err(StartError::State("already started")),
                State::Closed => return Err(StartError::State("closed")),
            }
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let (snap_tx, snap_rx) = mpsc::unbounded_channel();
            let (stop_tx, stop_rx) = oneshot::channel();
            let (url, config, timeout) = (
                self.url.clone(),
                SubscriberConfig::new(self.filter.clone()),
                self.connect_timeout,
            );
            let thread = std::thread::Builder::new()
                .name("fpm-subscriber".into())
                .spawn(move || run(url, config, timeout, ready_tx, snap_rx, stop_rx))
                .map_err(|e| StartError::Connect(format!("cannot start a thread: {e}")))?;
            match ready_rx.recv() {
                Ok(Ok(())) => {
                    *g = State::Running(Running {
                        snapshots: snap_tx,
                        stop: stop_tx,
                        thread,
                    });
                    Ok(())
                }
                Ok(Err(why)) => {
                    let _ = thread.join();
                    Err(StartError::Connect(why))
                }
                Err(_) => {
                    let _ = thread.join();
                    Err(StartError::Connect("the subscriber thread died".into()))
                }
            }
        });
        r.map_err(|e| match e {
            StartError::State(s) => PyRuntimeError::new_err(format!("the subscriber was {s}")),
            StartError::Connect(s) => PyConnectionError::new_err(s),
        })
    }

    /// Dynamo's name for `start()` (`FpmEventSubscriber.start_tracking`).
    fn start_tracking(&self, py: Python<'_>) -> PyResult<()> {
        self.start(py)
    }

    /// Like Dynamo's `FpmEventSubscriber.get_recent_stats()`: `{(worker_id, dp_rank):
    /// bytes}`, the latest message of every tracked stream, msgpack-encoded as on the wire.
    fn get_recent_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.snapshot(py)?;
        let d = PyDict::new(py);
        for st in &snap.streams {
            let bytes = fpm_schema::encode(&st.latest);
            d.set_item(key(py, st)?, PyBytes::new(py, &bytes))?;
        }
        Ok(d)
    }

    /// `{(worker_id, dp_rank): dict}`: the latest message of every tracked stream as a dict
    /// of its fields (`scheduled_requests` and `queued_requests` nested dicts).
    fn latest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.snapshot(py)?;
        let d = PyDict::new(py);
        for st in &snap.streams {
            d.set_item(key(py, st)?, metrics_dict(py, &st.latest)?)?;
        }
        Ok(d)
    }

    /// `{(worker_id, dp_rank): dict}`: per stream, its counts (`received`, `iterations`,
    /// `heartbeats`, `gap_messages`, `gaps`, `duplicates`, `reordered`, `late`, `restarts`,
    /// `missed_before_start`), `stale` (silent for 5 s) and `source` (namespace/component/
    /// endpoint).
    fn streams<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.snapshot(py)?;
        let d = PyDict::new(py);
        for st in &snap.streams {
            let s = counts_dict(py, &st.counts)?;
            s.set_item("stale", st.stale)?;
            s.set_item("source", st.source.to_string())?;
            d.set_item(key(py, st)?, s)?;
        }
        Ok(d)
    }

    /// The counters: `received` (NATS messages), `samples` (decoded), `rejected` (by
    /// reason), `tracked_streams`, `untracked`, `slow_consumer_drops`, `streams` (the
    /// per-stream counts summed, removed streams included) and `sequence` (envelope
    /// sequence accounting per relay: `publishers`, `gap_messages`, `resets`, `untracked`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.snapshot(py)?.stats;
        let d = PyDict::new(py);
        d.set_item("received", s.received)?;
        d.set_item("samples", s.samples)?;
        let rejected = PyDict::new(py);
        for (reason, n) in s.rejected.by_reason() {
            rejected.set_item(reason, n)?;
        }
        d.set_item("rejected", rejected)?;
        d.set_item("tracked_streams", s.tracked_streams)?;
        d.set_item("untracked", s.untracked)?;
        d.set_item("slow_consumer_drops", s.slow_consumer_drops)?;
        d.set_item("streams", counts_dict(py, &s.streams)?)?;
        let seq = PyDict::new(py);
        seq.set_item("publishers", s.sequence.publishers)?;
        seq.set_item("gap_messages", s.sequence.gap_messages)?;
        seq.set_item("resets", s.sequence.resets)?;
        seq.set_item("untracked", s.sequence.untracked)?;
        d.set_item("sequence", seq)?;
        Ok(d)
    }

    /// The NATS subjects subscribed to.
    #[getter]
    fn subjects(&self) -> Vec<String> {
        self.filter.nats_subjects()
    }

    /// Stops the background thread and disconnects (waits for it, without the GIL). Safe to
    /// call twice.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.shut_down());
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start(slf.py())?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        let state = match &*self.lock() {
            State::New => "new",
            State::Running(_) => "running",
            State::Closed => "closed",
        };
        format!(
            "fpm.Subscriber({:?}, {:?}, {state})",
            self.url,
            self.subjects()
        )
    }
}

impl Drop for PySubscriber {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Adds the planner classes and `Subscriber` to `fpm._native`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrefillModel>()?;
    m.add_class::<PyDecodeModel>()?;
    m.add_class::<PyAggModel>()?;
    m.add_class::<PySubscriber>()?;
    Ok(())
}
