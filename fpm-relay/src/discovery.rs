//! Dynamo's file discovery (`DYN_FILE_KV`): the EventChannel record a publisher keeps alive.
//!
//! Layout and behaviour as measured against Dynamo 1.6.1: the key
//! `namespace/{ns}/component/{c}/endpoint/{e}/topic/forward-pass-metrics/{publisher_id hex}`
//! with every non-alphanumeric byte percent-encoded (upper-case hex) is a file under
//! `{dir}/v1/event_channels/`, holding compact JSON without a trailing newline, written
//! atomically. Dynamo deletes records whose mtime is older than about 10 s, so the owner
//! refreshes the mtime every few seconds, and removes the file when it stops.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fpm_schema::{FpmSubject, FPM_TOPIC};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Serialize;

/// Percent-encodes every byte that is not an ASCII letter or digit, upper-case hex.
pub(crate) fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, NON_ALPHANUMERIC).to_string()
}

/// Dynamo's `DiscoveryInstance::EventChannel`, field for field, in its serialization order.
#[derive(Serialize)]
struct EventChannel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    scope: Scope<'a>,
    topic: &'a str,
    instance_id: u64,
    transport: Transport<'a>,
}

#[derive(Serialize)]
struct Scope<'a> {
    kind: &'static str,
    endpoint: EndpointId<'a>,
}

#[derive(Serialize)]
struct EndpointId<'a> {
    namespace: &'a str,
    component: &'a str,
    name: &'a str,
}

#[derive(Serialize)]
struct Transport<'a> {
    kind: &'static str,
    config: NatsTransport<'a>,
}

#[derive(Serialize)]
struct NatsTransport<'a> {
    subject_prefix: &'a str,
}

/// The record file's path and contents, for an endpoint-scope subject.
pub(crate) fn record(
    dir: &Path,
    subject: &FpmSubject,
    publisher_id: u64,
) -> Option<(PathBuf, String)> {
    let endpoint = subject.endpoint_name()?;
    let (ns, c, e) = (
        subject.namespace().as_str(),
        subject.component_name().as_str(),
        endpoint.as_str(),
    );
    let key =
        format!("namespace/{ns}/component/{c}/endpoint/{e}/topic/{FPM_TOPIC}/{publisher_id:x}");
    let path = dir.join("v1").join("event_channels").join(encode_key(&key));
    let prefix = subject.prefix();
    let json = serde_json::to_string(&EventChannel {
        kind: "EventChannel",
        scope: Scope {
            kind: "endpoint",
            endpoint: EndpointId {
                namespace: ns,
                component: c,
                name: e,
            },
        },
        topic: FPM_TOPIC,
        instance_id: publisher_id,
        transport: Transport {
            kind: "Nats",
            config: NatsTransport {
                subject_prefix: &prefix,
            },
        },
    })
    .ok()?;
    Some((path, json))
}

/// Writes `contents` to `path` atomically (temp file in the same directory, then rename).
pub(crate) fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp_{:016x}", crate::relay::random_u64()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Sets the record's mtime to now, rewriting it if someone removed it.
pub(crate) fn refresh(path: &Path, contents: &str) -> io::Result<()> {
    match fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f.set_modified(SystemTime::now()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomic(path, contents),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_matches_dynamo() {
        let s = FpmSubject::endpoint("fpmtest", "worker", "generate").unwrap();
        let (p, json) = record(Path::new("/kv"), &s, 867563565198844).unwrap();
        assert_eq!(
            p,
            Path::new("/kv/v1/event_channels/namespace%2Ffpmtest%2Fcomponent%2Fworker%2Fendpoint%2Fgenerate%2Ftopic%2Fforward%2Dpass%2Dmetrics%2F3150b621fadfc")
        );
        // Exact bytes of the record Dynamo 1.6.1 wrote (dynamo-findings §2).
        assert_eq!(
            json,
            r#"{"type":"EventChannel","scope":{"kind":"endpoint","endpoint":{"namespace":"fpmtest","component":"worker","name":"generate"}},"topic":"forward-pass-metrics","instance_id":867563565198844,"transport":{"kind":"Nats","config":{"subject_prefix":"namespace.fpmtest.component.worker.endpoint.generate"}}}"#
        );
        assert!(record(
            Path::new("/kv"),
            &FpmSubject::component("a", "b").unwrap(),
            1
        )
        .is_none());
    }

    proptest::proptest! {
        /// Any names a subject accepts give a record that parses back to the same fields.
        #[test]
        fn records_parse_back(
            ns in "[a-zA-Z0-9_-]{1,20}",
            c in "[a-zA-Z0-9_-]{1,20}",
            e in "[a-zA-Z0-9_-]{1,20}",
            id in 1u64..(1 << 53),
        ) {
            let Ok(s) = FpmSubject::endpoint(&ns, &c, &e) else { return Ok(()) };
            let (p, json) = record(Path::new("/kv"), &s, id).unwrap();
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            proptest::prop_assert_eq!(&v["scope"]["endpoint"]["namespace"], &serde_json::json!(ns));
            proptest::prop_assert_eq!(&v["scope"]["endpoint"]["component"], &serde_json::json!(c));
            proptest::prop_assert_eq!(&v["scope"]["endpoint"]["name"], &serde_json::json!(e));
            proptest::prop_assert_eq!(&v["instance_id"], &serde_json::json!(id));
            proptest::prop_assert_eq!(&v["transport"]["config"]["subject_prefix"], &serde_json::json!(s.prefix()));
            let name = p.file_name().unwrap().to_str().unwrap();
            proptest::prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'%'));
            let hex = format!("{id:x}");
            proptest::prop_assert!(name.ends_with(&hex));
        }
    }

    #[test]
    fn encodes_like_dynamo() {
        assert_eq!(
            encode_key("namespace/fpm-test/component/wor_ker"),
            "namespace%2Ffpm%2Dtest%2Fcomponent%2Fwor%5Fker"
        );
    }

    #[test]
    fn writes_refreshes_and_recreates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v1/event_channels/x");
        write_atomic(&p, "{}").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "{}");
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        refresh(&p, "{}").unwrap();
        let m = fs::metadata(&p).unwrap().modified().unwrap();
        assert!(m > old + std::time::Duration::from_secs(50));
        fs::remove_file(&p).unwrap();
        refresh(&p, "{}").unwrap();
        assert!(p.exists());
        assert_eq!(
            fs::read_dir(p.parent().unwrap()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}
