//! The engine side of Forward Pass Metrics: time each scheduler iteration (on the GPU, with
//! CUDA event pairs, when the `cuda` feature is built and a GPU is present), build its
//! [`ForwardPassMetrics`](fpm_schema::ForwardPassMetrics) and publish it over ZeroMQ, without
//! ever blocking or slowing the scheduler.
//!
//! - Scheduler side ([`Emitter`]): `begin_iteration`, `segment_start`/`segment_end` around each
//!   forward segment, `submit` with the batch and queue statistics (builders in `fpm-schema`).
//!   `submit` is a bounded, allocation-free `try_send`; a full queue drops and counts.
//! - Publisher thread: waits for each iteration's GPU events without blocking (polled, in
//!   iteration order), encodes, and sends three frames (`b""`, the counter as 8-byte
//!   big-endian, the msgpack payload) on a ZeroMQ socket it binds: `{ipc_base}.{dp_rank}`
//!   (SGLang) or `tcp://*:{port_base + dp_rank}` (Dynamo's vLLM layout,
//!   `DYN_FORWARDPASS_METRIC_PORT`). While the engine is idle it sends all-zero heartbeats.
//! - `counter_id` is stamped at submit time, so every drop (queue full, untimeable,
//!   multi-stream, no subscriber, full subscriber queue, shutdown) shows downstream as a gap
//!   and is counted here by reason ([`EmitterStats`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use fpm_emitter::{Emitter, EmitterConfig, Endpoint, StreamHandle};
//! use fpm_schema::{QueuedRequestsBuilder, ScheduledRequestsBuilder};
//!
//! let config = EmitterConfig::new(Endpoint::IpcBase("ipc:///tmp/fpm".into()), "worker-1", 0);
//! let mut emitter = Emitter::start(config)?;
//! // The stream the forward pass is launched on: `unsafe { StreamHandle::from_raw(ptr) }` with
//! // e.g. torch.cuda.current_stream().cuda_stream (see its safety contract).
//! let stream = StreamHandle::DEFAULT;
//! for _ in 0..3 {
//!     emitter.begin_iteration();
//!     emitter.time_segment(stream, || { /* launch the forward pass */ });
//!     let mut batch = ScheduledRequestsBuilder::new();
//!     batch.add_decode(1024);
//!     emitter.submit(batch.build(), QueuedRequestsBuilder::new().build());
//! }
//! emitter.set_idle(true);
//! let stats = emitter.shutdown(Duration::from_secs(1));
//! println!("{stats:?}");
//! # Ok::<(), fpm_emitter::EmitterError>(())
//! ```
#![deny(missing_docs)]

mod clock;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod emitter;
mod error;
mod stats;
mod transport;
mod zmtp_pub;

pub use clock::{ClockKind, CpuClock, IterationClock, Span, StreamHandle, TimingPoll};
pub use config::{ClockChoice, EmitterConfig, Endpoint, DEFAULT_TCP_PORT_BASE, PORT_ENV};
#[cfg(feature = "cuda")]
pub use cuda::{driver as cuda_driver, ContextSource, CudaClock};
pub use emitter::{Emitter, EmitterHandle};
pub use error::{CudaCode, CudaError, EmitterError, TimingError};
pub use stats::{DropCounts, DropReason, EmitterStats};
pub use transport::{MemoryTransport, SendError, SentMessage, Transport, Unsent, ZmqTransport};
