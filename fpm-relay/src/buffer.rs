//! The bounded hand-over between the input tasks and the NATS task.
//!
//! The ZeroMQ side never waits: [`Buffer::push`] either stores the message or refuses it at
//! once. Limits apply to the message count and to the payload bytes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::config::BufferLimits;
use crate::metrics::Metrics;

/// One valid message on its way to NATS.
#[derive(Debug)]
pub(crate) struct Item {
    /// The FPM payload, byte-for-byte as the engine sent it.
    pub payload: Bytes,
    /// When the input task read it (for the latency histogram).
    pub received: Instant,
}

#[derive(Debug)]
pub(crate) struct Buffer {
    queue: Mutex<Inner>,
    limits: BufferLimits,
    metrics: Arc<Metrics>,
    /// Woken on every push (a permit is stored when nobody waits, so no wake-up is lost).
    pub notify: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Item>,
    bytes: usize,
}

impl Buffer {
    pub fn new(limits: BufferLimits, metrics: Arc<Metrics>) -> Self {
        Buffer {
            queue: Mutex::new(Inner::default()),
            limits,
            metrics,
            notify: Notify::new(),
        }
    }

    /// Stores `item`, or gives it back when a limit would be exceeded.
    pub fn push(&self, item: Item) -> Result<(), Item> {
        let len = item.payload.len();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.items.len() >= self.limits.max_messages
                || q.bytes.saturating_add(len) > self.limits.max_bytes
            {
                return Err(item);
            }
            q.items.push_back(item);
            q.bytes += len;
            self.metrics.buffered.inc();
            self.metrics.buffered_bytes.inc_by(len as i64);
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Takes the oldest message.
    pub fn pop(&self) -> Option<Item> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let item = q.items.pop_front()?;
        q.bytes -= item.payload.len();
        self.metrics.buffered.dec();
        self.metrics
            .buffered_bytes
            .dec_by(item.payload.len() as i64);
        Some(item)
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .is_empty()
    }

    /// Empties the buffer, returning how many messages it held.
    pub fn clear(&self) -> u64 {
        let mut n = 0;
        while self.pop().is_some() {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> Item {
        Item {
            payload: Bytes::from(vec![0; n]),
            received: Instant::now(),
        }
    }

    #[test]
    fn limits_by_count_and_bytes() {
        let m = Arc::new(Metrics::new());
        let b = Buffer::new(
            BufferLimits {
                max_messages: 3,
                max_bytes: 100,
            },
            m.clone(),
        );
        assert!(b.push(item(10)).is_ok());
        assert!(b.push(item(10)).is_ok());
        assert!(b.push(item(81)).is_err(), "bytes limit");
        assert!(b.push(item(80)).is_ok());
        assert!(b.push(item(0)).is_err(), "count limit");
        assert_eq!(m.stats().buffered, 3);
        assert_eq!(m.stats().buffered_bytes, 100);
        assert_eq!(b.pop().map(|i| i.payload.len()), Some(10));
        assert_eq!(b.clear(), 2);
        assert_eq!(m.stats().buffered_bytes, 0);
        assert!(b.pop().is_none());
    }
}
