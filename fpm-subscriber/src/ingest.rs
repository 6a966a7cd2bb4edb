//! From NATS message bytes to a [`Sample`]: envelope, topic, payload, version. Every message
//! that does not become a sample is counted by reason; none is fatal.

use std::collections::HashMap;
use std::sync::Arc;

use fpm_schema::{Decoder, Envelope, ForwardPassMetrics, ENVELOPE_OVERHEAD, FPM_TOPIC};

use crate::filter::{Source, SubjectFilter};

/// One decoded FPM message with where and when it arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When this process received it (Unix nanoseconds).
    pub received_at_ns: u64,
    /// The relay that published it (envelope).
    pub publisher_id: u64,
    /// The relay's sequence number (envelope).
    pub sequence: u64,
    /// When the relay published it (Unix milliseconds, envelope).
    pub published_at_ms: u64,
    /// Namespace, component and endpoint, from the subject.
    pub source: Arc<Source>,
    /// The engine's message.
    pub metrics: ForwardPassMetrics,
}

impl Sample {
    /// An idle heartbeat (`wall_time == 0`): not a planner sample.
    pub fn is_heartbeat(&self) -> bool {
        self.metrics.wall_time == 0.0
    }
}

/// Why a message did not become a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The subject is not an FPM subject of the filter.
    Subject,
    /// The envelope could not be decoded.
    Envelope,
    /// The envelope's topic is not `forward-pass-metrics`.
    Topic,
    /// The payload could not be decoded.
    Payload,
    /// The payload's `version` is not 1.
    Version,
    /// Larger than the size limit.
    TooLarge,
}

impl RejectReason {
    /// Every reason, in a fixed order.
    pub const ALL: [RejectReason; 6] = [
        RejectReason::Subject,
        RejectReason::Envelope,
        RejectReason::Topic,
        RejectReason::Payload,
        RejectReason::Version,
        RejectReason::TooLarge,
    ];

    /// The metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::Subject => "bad_subject",
            RejectReason::Envelope => "bad_envelope",
            RejectReason::Topic => "wrong_topic",
            RejectReason::Payload => "bad_payload",
            RejectReason::Version => "unsupported_version",
            RejectReason::TooLarge => "too_large",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Rejected messages by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RejectCounts([u64; RejectReason::ALL.len()]);

impl RejectCounts {
    /// Count of one reason.
    pub fn get(&self, r: RejectReason) -> u64 {
        self.0[r.index()]
    }

    /// All rejected.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// `(label, count)` pairs.
    pub fn by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        RejectReason::ALL.iter().map(|r| (r.as_str(), self.get(*r)))
    }
}

/// Decodes messages; keeps the reject counts and a small cache of sources by subject.
#[derive(Debug)]
pub struct Ingest {
    filter: SubjectFilter,
    decoder: Decoder,
    max_envelope: usize,
    sources: HashMap<String, Arc<Source>>,
    /// Messages seen, samples made, rejects by reason.
    received: u64,
    samples: u64,
    rejected: RejectCounts,
}

/// Distinct subjects remembered for their parsed source, at most (more are parsed each time).
const MAX_SOURCES: usize = 4096;

impl Ingest {
    /// Decodes what `filter` subscribes to, payloads up to `max_payload` bytes.
    pub fn new(filter: SubjectFilter, max_payload: usize) -> Self {
        Ingest {
            filter,
            decoder: Decoder::new().with_max_size(max_payload),
            max_envelope: max_payload + ENVELOPE_OVERHEAD + FPM_TOPIC.len(),
            sources: HashMap::new(),
            received: 0,
            samples: 0,
            rejected: RejectCounts::default(),
        }
    }

    /// The filter.
    pub fn filter(&self) -> &SubjectFilter {
        &self.filter
    }

    /// Turns one NATS message into a sample, or counts why not.
    ///
    /// # Errors
    /// The reason (already counted).
    pub fn ingest(
        &mut self,
        subject: &str,
        body: &[u8],
        received_at_ns: u64,
    ) -> Result<Sample, RejectReason> {
        self.received += 1;
        let r = self.decode(subject, body, received_at_ns);
        match &r {
            Ok(_) => self.samples += 1,
            Err(reason) => self.rejected.0[reason.index()] += 1,
        }
        r
    }

    fn decode(
        &mut self,
        subject: &str,
        body: &[u8],
        received_at_ns: u64,
    ) -> Result<Sample, RejectReason> {
        let source = self.source(subject).ok_or(RejectReason::Subject)?;
        let env = Envelope::decode_with_limit(body, self.max_envelope).map_err(|e| match e {
            fpm_schema::DecodeError::TooLarge { .. } => RejectReason::TooLarge,
            _ => RejectReason::Envelope,
        })?;
        if env.topic != FPM_TOPIC {
            return Err(RejectReason::Topic);
        }
        let metrics = self.decoder.decode(env.payload).map_err(|e| match e {
            fpm_schema::DecodeError::TooLarge { .. } => RejectReason::TooLarge,
            e if e.reason() == "unsupported_version" => RejectReason::Version,
            _ => RejectReason::Payload,
        })?;
        Ok(Sample {
            received_at_ns,
            publisher_id: env.publisher_id,
            sequence: env.sequence,
            published_at_ms: env.published_at,
            source,
            metrics,
        })
    }

    fn source(&mut self, subject: &str) -> Option<Arc<Source>> {
        if let Some(s) = self.sources.get(subject) {
            return Some(s.clone());
        }
        let s = Arc::new(self.filter.source_of(subject)?);
        if self.sources.len() < MAX_SOURCES {
            self.sources.insert(subject.to_owned(), s.clone());
        }
        Some(s)
    }

    /// Messages handed to [`Ingest::ingest`].
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Samples made.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Rejected, by reason. `received == samples + rejected.total()`.
    pub fn rejected(&self) -> RejectCounts {
        self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::ScopeFilter;

    const SUBJ: &str = "namespace.ns.component.c.endpoint.e.forward-pass-metrics";

    fn envelope(payload: &[u8], topic: &str) -> Vec<u8> {
        Envelope {
            publisher_id: 7,
            sequence: 3,
            published_at: 1_700_000_000_000,
            topic,
            payload,
        }
        .encode()
    }

    fn ingest() -> Ingest {
        Ingest::new(
            SubjectFilter::parse("ns", "*", "*", ScopeFilter::Any).unwrap(),
            fpm_schema::DEFAULT_MAX_SIZE,
        )
    }

    #[test]
    fn good_and_bad_messages_are_counted() {
        let mut i = ingest();
        let mut m = ForwardPassMetrics::heartbeat("w", 1);
        m.wall_time = 0.01;
        let good = envelope(&fpm_schema::encode(&m), FPM_TOPIC);
        let s = i.ingest(SUBJ, &good, 5).unwrap();
        assert_eq!((s.publisher_id, s.sequence, s.received_at_ns), (7, 3, 5));
        assert_eq!(s.metrics, m);
        assert_eq!(s.source.to_string(), "ns/c/e");
        assert!(!s.is_heartbeat());

        assert_eq!(
            i.ingest("namespace.x.component.c.forward-pass-metrics", &good, 0),
            Err(RejectReason::Subject)
        );
        assert_eq!(i.ingest(SUBJ, b"\x93junk", 0), Err(RejectReason::Envelope));
        let other = envelope(&fpm_schema::encode(&m), "kv-events");
        assert_eq!(i.ingest(SUBJ, &other, 0), Err(RejectReason::Topic));
        assert_eq!(
            i.ingest(SUBJ, &envelope(b"\xc1", FPM_TOPIC), 0),
            Err(RejectReason::Payload)
        );
        let mut v2 = fpm_schema::encode(&m);
        // `version` is the first value of the map: fixint 1 -> 2.
        let at = v2.iter().position(|&b| b == 1).unwrap();
        v2[at] = 2;
        assert_eq!(
            i.ingest(SUBJ, &envelope(&v2, FPM_TOPIC), 0),
            Err(RejectReason::Version)
        );
        let huge = envelope(&vec![0u8; 70_000], FPM_TOPIC);
        assert_eq!(i.ingest(SUBJ, &huge, 0), Err(RejectReason::TooLarge));
        assert_eq!(i.received(), 7);
        assert_eq!(i.samples(), 1);
        assert_eq!(i.rejected().total(), 6);
        assert_eq!(i.received(), i.samples() + i.rejected().total());
    }
}
