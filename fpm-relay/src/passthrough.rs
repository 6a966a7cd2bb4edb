//! The engine's own Prometheus metrics on the relay's `/metrics`, as Dynamo's workers do: on
//! every scrape the engine endpoints are fetched at once (each within a timeout), the families
//! whose names start with an allowed prefix (`sglang:`, `vllm:`, `trtllm_` by default) are
//! kept, line for line, and appended after the relay's own.
//!
//! Format: with engines configured, `/metrics` is the text format 0.0.4, which every
//! Prometheus accepts. The engines are asked for the text format too: Python's
//! `prometheus_client` (what SGLang and vLLM use), asked for OpenMetrics, escapes the colons
//! of `sglang:`/`vllm:` sample names to underscores while its `# HELP`/`# TYPE` lines keep
//! them (measured with 0.23.1 and 0.26.0, `escaping=underscores`), so its OpenMetrics answer
//! cannot be passed through by name. The relay's own families are rewritten from OpenMetrics
//! to the text format (counter and info families named by their sample, `# UNIT`, `# EOF`,
//! `_created` and exemplars dropped). An engine that answers OpenMetrics anyway gets the same
//! rewrite before its families are filtered. Without engines, `/metrics` stays OpenMetrics.
//!
//! An engine that is down, slow, answers an error or something that is not the exposition
//! format adds nothing and is counted in `fpm_relay_engine_scrape_errors_total{url,reason}`;
//! the relay's own metrics always come back, at most one timeout late. Families that two
//! engines both expose are merged (one HELP/TYPE, all samples); a sample line seen twice, or a
//! family named like one of the relay's, is dropped and counted (`duplicate`).
//!
//! The lines are checked (metric and label names, quoted label values, a number as value)
//! rather than parsed into a model and printed again, so that what is appended is byte for
//! byte what the engine said.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Prefixes kept when none are configured: SGLang's, vLLM's and TensorRT-LLM's families.
pub const DEFAULT_PREFIXES: [&str; 3] = ["sglang:", "vllm:", "trtllm_"];
/// Largest engine answer read, bytes.
const MAX_BODY: usize = 16 << 20;

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What the engines are asked for (see the module doc for why not OpenMetrics).
const ASK: &str = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1";

/// Why an engine scrape added nothing (or less than it sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Nothing listens, or the connection broke.
    Connect,
    /// No complete answer within the timeout.
    Timeout,
    /// An HTTP status other than 2xx.
    Status,
    /// Over 16 MiB.
    TooLarge,
    /// Not UTF-8, or a line that is not the exposition format: the whole answer is dropped.
    Malformed,
    /// A sample or family that another engine (or the relay) already has: the line is dropped.
    Duplicate,
}

impl Reason {
    const ALL: [Reason; 6] = [
        Reason::Connect,
        Reason::Timeout,
        Reason::Status,
        Reason::TooLarge,
        Reason::Malformed,
        Reason::Duplicate,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Timeout => "timeout",
            Reason::Status => "status",
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::Duplicate => "duplicate",
        }
    }
}

type UrlReason = [(&'static str, String); 2];
type UrlLabel = [(&'static str, String); 1];

/// One engine endpoint.
#[derive(Debug)]
struct Target {
    url: String,
    authority: String,
    path: String,
    errors: Vec<Counter>,
    duration: Gauge<f64, AtomicU64>,
}

/// The configured engine endpoints and their metrics.
#[derive(Debug)]
pub(crate) struct Passthrough {
    targets: Vec<Arc<Target>>,
    prefixes: Vec<String>,
    timeout: Duration,
    /// One scrape of the engines at a time: concurrent `/metrics` requests wait their turn,
    /// so at most one set of engine answers is held in memory.
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// Checks one engine metrics URL: `http://HOST:PORT/PATH`.
pub(crate) fn check_url(url: &str) -> Result<(String, String), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}): use http://HOST:PORT/metrics"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// is supported: use http://HOST:PORT/metrics".into());
    }
    let Some(auth) = uri.authority() else {
        return Err("no host: use http://HOST:PORT/metrics".into());
    };
    let authority = if auth.port().is_some() {
        auth.as_str().to_owned()
    } else {
        format!("{}:80", auth.as_str())
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((authority, path))
}

impl Passthrough {
    /// Registers the scrape metrics for `urls` (already checked with [`check_url`]).
    pub fn new(
        urls: &[String],
        prefixes: &[String],
        timeout: Duration,
        registry: &mut Registry,
    ) -> Result<Self, String> {
        let errors = Family::<UrlReason, Counter>::default();
        let duration = Family::<UrlLabel, Gauge<f64, AtomicU64>>::default();
        let mut targets = Vec::new();
        for url in urls {
            let (authority, path) = check_url(url)?;
            targets.push(Arc::new(Target {
                url: url.clone(),
                authority,
                path,
                errors: Reason::ALL
                    .iter()
                    .map(|r| {
                        errors
                            .get_or_create(&[
                                ("url", url.clone()),
                                ("reason", r.as_str().to_owned()),
                            ])
                            .clone()
                    })
                    .collect(),
                duration: duration.get_or_create(&[("url", url.clone())]).clone(),
            }));
        }
        registry.register(
            "fpm_relay_engine_scrape_errors",
            "Engine metrics scrapes that added nothing (connect, timeout, status, too_large, malformed) and engine lines dropped as duplicates, by engine URL",
            errors,
        );
        registry.register(
            "fpm_relay_engine_scrape_duration_seconds",
            "How long the last scrape of each engine metrics URL took (up to the timeout)",
            duration,
        );
        Ok(Passthrough {
            targets,
            prefixes: prefixes.to_vec(),
            timeout,
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }

    /// The relay's own metrics (`own`, OpenMetrics text) in the text format 0.0.4 with the
    /// engines' families appended; returns the content type and the body.
    pub async fn render(&self, own: String) -> (&'static str, String) {
        let _turn = self.one_at_a_time.lock().await;
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let (t, timeout) = (t.clone(), self.timeout);
            set.spawn(async move {
                let started = Instant::now();
                let r = tokio::time::timeout(timeout, fetch(&t, ASK))
                    .await
                    .unwrap_or(Err(Reason::Timeout));
                t.duration.set(started.elapsed().as_secs_f64());
                (i, r)
            });
        }
        let mut answers: Vec<Option<String>> = vec![None; self.targets.len()];
        while let Some(joined) = set.join_next().await {
            let Ok((i, r)) = joined else { continue };
            match r {
                Ok((om, body)) if om => answers[i] = Some(openmetrics_to_text(&body)),
                Ok((_, body)) => answers[i] = Some(body),
                Err(reason) => self.count(i, reason, 1),
            }
        }
        let mut out = openmetrics_to_text(&own);
        let own_names = family_names(&out);
        let mut families = Families::default();
        for (i, a) in answers.iter().enumerate() {
            let Some(body) = a else { continue };
            if !valid_exposition(body) {
                self.count(i, Reason::Malformed, 1);
                continue;
            }
            let dups = families.add(body, &self.prefixes, &own_names, false);
            self.count(i, Reason::Duplicate, dups);
        }
        families.write(&mut out);
        (TEXT, out)
    }

    fn count(&self, target: usize, reason: Reason, n: u64) {
        if n == 0 {
            return;
        }
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        if let Some(t) = self.targets.get(target) {
            tracing::debug!(url = %t.url, reason = reason.as_str(), lines = n, "engine metrics scrape: counted");
            if let Some(c) = t.errors.get(i) {
                c.inc_by(n);
            }
        }
    }
}

/// One GET; the answer's body and whether it is OpenMetrics.
async fn fetch(t: &Target, accept: &str) -> Result<(bool, String), Reason> {
    let stream = tokio::net::TcpStream::connect(&t.authority)
        .await
        .map_err(|_| Reason::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Reason::Connect)?;
    let conn = tokio::spawn(conn);
    let req = Request::get(t.path.as_str())
        .header(HOST, t.authority.as_str())
        .header(ACCEPT, accept)
        .body(Empty::<Bytes>::new())
        .map_err(|_| Reason::Connect)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|_| Reason::Connect)?;
    if !resp.status().is_success() {
        conn.abort();
        return Err(Reason::Status);
    }
    let om = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/openmetrics-text"));
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Reason::TooLarge
            } else {
                Reason::Connect
            }
        })?
        .to_bytes();
    conn.abort();
    let text = String::from_utf8(Vec::from(body)).map_err(|_| Reason::Malformed)?;
    Ok((om, text))
}

/// Families in first-seen order: their header lines, then their sample lines.
#[derive(Debug, Default)]
struct Families {
    order: Vec<String>,
    by_name: HashMap<String, Fam>,
    samples_seen: HashSet<String>,
}

#[derive(Debug, Default)]
struct Fam {
    help: Option<String>,
    kind: Option<String>,
    unit: Option<String>,
    samples: Vec<String>,
}

/// Suffixes by which a sample belongs to the family named before them.
const SUFFIXES: [&str; 8] = [
    "_total", "_created", "_bucket", "_sum", "_count", "_info", "_gsum", "_gcount",
];

impl Families {
    /// Adds the allowed families of one engine answer; returns how many lines were dropped
    /// as duplicates.
    fn add(&mut self, body: &str, prefixes: &[String], own: &HashSet<String>, om: bool) -> u64 {
        let allowed = |name: &str| prefixes.iter().any(|p| name.starts_with(p.as_str()));
        let mut dups = 0;
        let mut current: Option<String> = None;
        for line in body.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (Some(kw), Some(name)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if !matches!(kw, "HELP" | "TYPE" | "UNIT") {
                    continue; // `# EOF` and plain comments
                }
                current = Some(name.to_owned());
                if !allowed(name) {
                    continue;
                }
                if own.contains(name) {
                    dups += 1;
                    continue;
                }
                if kw == "UNIT" && !om {
                    continue;
                }
                let f = self.family(name);
                let slot = match kw {
                    "HELP" => &mut f.help,
                    "TYPE" => &mut f.kind,
                    _ => &mut f.unit,
                };
                if slot.is_none() {
                    *slot = Some(line.to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = sample_name(line);
            if !allowed(name) {
                continue;
            }
            let family = match &current {
                Some(c)
                    if name == c || SUFFIXES.iter().any(|s| name.strip_suffix(s) == Some(c)) =>
                {
                    c.clone()
                }
                _ => name.to_owned(),
            };
            if own.contains(&family) {
                dups += 1;
                continue;
            }
            // Without the exemplar (OpenMetrics only) when answering the text format.
            let kept = if om { line } else { without_exemplar(line) };
            let key = kept.rsplit_once(' ').map_or(kept, |(k, _)| k);
            if !self.samples_seen.insert(key.to_owned()) {
                dups += 1;
                continue;
            }
            self.family(&family).samples.push(kept.to_owned());
        }
        dups
    }

    fn family(&mut self, name: &str) -> &mut Fam {
        if !self.by_name.contains_key(name) {
            self.order.push(name.to_owned());
        }
        self.by_name.entry(name.to_owned()).or_default()
    }

    fn write(&self, out: &mut String) {
        for name in &self.order {
            let f = &self.by_name[name];
            for l in [&f.help, &f.kind, &f.unit].into_iter().flatten() {
                out.push_str(l);
                out.push('\n');
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
    }
}

/// The metric name a sample line starts with.
fn sample_name(line: &str) -> &str {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    &line[..end]
}

/// Family names declared (`# TYPE`/`# HELP`) in an exposition text, plus their sample names.
fn family_names(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            if let (Some("TYPE" | "HELP"), Some(name)) = (parts.next(), parts.next()) {
                out.insert(name.to_owned());
                for s in SUFFIXES {
                    out.insert(format!("{name}{s}"));
                }
            }
        }
    }
    out
}

fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn is_number(s: &str) -> bool {
    matches!(s, "+Inf" | "-Inf" | "Inf" | "NaN" | "+inf" | "-inf" | "nan")
        || s.parse::<f64>().is_ok()
}

/// Whether every line is a comment or a well-formed sample: `name{l="v",...} value [ts]`
/// (an OpenMetrics exemplar after ` # ` is allowed).
fn valid_exposition(body: &str) -> bool {
    body.lines().all(|line| {
        if line.trim().is_empty() || line.starts_with('#') {
            return true;
        }
        let line = without_exemplar(line);
        let name = sample_name(line);
        if !is_name(name) {
            return false;
        }
        let mut rest = &line[name.len()..];
        if let Some(labels) = rest.strip_prefix('{') {
            let Some(after) = skip_labels(labels) else {
                return false;
            };
            rest = after;
        }
        let mut fields = rest.split_ascii_whitespace();
        let value_ok = fields.next().is_some_and(is_number);
        let ts_ok = fields.next().is_none_or(is_number);
        value_ok && ts_ok && fields.next().is_none()
    })
}

/// A sample line without its OpenMetrics exemplar (` # {...} value`): the ` # ` is looked for
/// only after the label set, whose quoted values may hold `#`, spaces and braces.
fn without_exemplar(line: &str) -> &str {
    let name = sample_name(line);
    let rest = &line[name.len()..];
    let after_labels = match rest.strip_prefix('{') {
        Some(labels) => match skip_labels(labels) {
            Some(after) => after,
            None => return line,
        },
        None => rest,
    };
    let start = line.len() - after_labels.len();
    match after_labels.find(" # ") {
        Some(i) => &line[..start + i],
        None => line,
    }
}

/// Checks `l="v",...}` and returns what follows the `}`.
fn skip_labels(mut s: &str) -> Option<&str> {
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some(after);
        }
        let eq = s.find('=')?;
        if !is_name(s[..eq].trim()) {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        // The quoted value, with backslash escapes.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in s.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        s = s[end? + 1..].trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

/// The relay's own OpenMetrics text in the text format 0.0.4: counter families are named by
/// their `_total` sample and info families by their `_info` sample; `# UNIT`, `# EOF`,
/// `_created` samples and exemplars are dropped; `unknown` becomes `untyped`.
pub(crate) fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut kinds: HashMap<String, String> = HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                kinds.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    let renamed = |name: &str| -> String {
        match kinds.get(name).map(String::as_str) {
            Some("counter") => format!("{name}_total"),
            Some("info") => format!("{name}_info"),
            _ => name.to_owned(),
        }
    };
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                let kind = match kind {
                    "counter" => "counter",
                    "gauge" | "info" | "stateset" => "gauge",
                    "histogram" => "histogram",
                    "summary" => "summary",
                    _ => "untyped",
                };
                out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = without_exemplar(line);
        if sample_name(sample).ends_with("_created") {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: &str = "# HELP sglang:num_running_reqs Running requests\n# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"m\",tp_rank=\"0\"} 3.0\n# HELP python_gc_objects_collected_total Objects collected\n# TYPE python_gc_objects_collected_total counter\npython_gc_objects_collected_total{generation=\"0\"} 12.0\n# HELP sglang:prompt_tokens_total Prompt tokens\n# TYPE sglang:prompt_tokens_total counter\nsglang:prompt_tokens_total{model_name=\"m\"} 42.0\n# HELP sglang:e2e_request_latency_seconds Latency\n# TYPE sglang:e2e_request_latency_seconds histogram\nsglang:e2e_request_latency_seconds_bucket{le=\"0.1\",model_name=\"m\"} 1.0\nsglang:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 2.0\nsglang:e2e_request_latency_seconds_count{model_name=\"m\"} 2.0\nsglang:e2e_request_latency_seconds_sum{model_name=\"m\"} 0.5\n";

    fn prefixes() -> Vec<String> {
        DEFAULT_PREFIXES.iter().map(|p| (*p).to_owned()).collect()
    }

    #[test]
    fn filters_by_prefix_and_merges_engines() {
        let mut f = Families::default();
        assert_eq!(f.add(ENGINE, &prefixes(), &HashSet::new(), false), 0);
        // A second engine (another rank) with the same families and its own samples.
        let second = ENGINE.replace("tp_rank=\"0\"", "tp_rank=\"1\"");
        let dups = f.add(&second, &prefixes(), &HashSet::new(), false);
        // Its samples without tp_rank are the same lines: dropped and counted.
        assert_eq!(dups, 5);
        let mut out = String::new();
        f.write(&mut out);
        assert!(!out.contains("python_gc"), "{out}");
        assert_eq!(
            out.matches("# TYPE sglang:num_running_reqs gauge").count(),
            1
        );
        assert!(out.contains("tp_rank=\"0\"} 3.0") && out.contains("tp_rank=\"1\"} 3.0"));
        assert!(out.contains(
            "sglang:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 2.0"
        ));
        assert!(valid_exposition(&out));
    }

    #[test]
    fn a_family_named_like_the_relays_is_dropped() {
        let own = family_names("# TYPE sglang:x counter\n");
        let mut f = Families::default();
        let dups = f.add(
            "# TYPE sglang:x counter\nsglang:x_total 1\n",
            &prefixes(),
            &own,
            false,
        );
        assert_eq!(dups, 2);
        let mut out = String::new();
        f.write(&mut out);
        assert!(out.is_empty(), "{out}");
    }

    /// Label values may hold ` # `, spaces and braces (a worker id from the wire): they are
    /// not exemplars, and the line stays whole.
    #[test]
    fn hashes_inside_label_values_are_not_exemplars() {
        let line =
            "fpm_relay_input_received_messages_total{worker_id=\"a # b {x}\",dp_rank=\"0\"} 3";
        assert_eq!(without_exemplar(line), line);
        assert!(valid_exposition(line));
        let om = format!("# TYPE fpm_relay_input_received_messages counter\n{line}\n# EOF\n");
        assert!(openmetrics_to_text(&om).contains(line));
        let with = "x_total{a=\"# \"} 1 # {trace_id=\"t\"} 1";
        assert_eq!(without_exemplar(with), "x_total{a=\"# \"} 1");
        let mut f = Families::default();
        f.add(
            &format!("{line}\n"),
            &["fpm_".to_owned()],
            &HashSet::new(),
            false,
        );
        let mut out = String::new();
        f.write(&mut out);
        assert_eq!(out, format!("{line}\n"));
    }

    #[test]
    fn garbage_is_not_exposition() {
        assert!(valid_exposition(ENGINE));
        assert!(valid_exposition("x{a=\"b\\\"}\"} 1 123\n# EOF\n"));
        assert!(valid_exposition("x_total 1 # {trace_id=\"a\"} 1\n"));
        for bad in [
            "<html>not found</html>",
            "x{a=\"b} 1",
            "x{a=b} 1",
            "x 1 2 3",
            "x one",
            "1x 1",
            "x{=\"v\"} 1",
        ] {
            assert!(!valid_exposition(bad), "{bad}");
        }
    }

    #[test]
    fn openmetrics_to_text_renames_counters_and_drops_om_lines() {
        let om = "# HELP fpm_relay_received_messages Messages.\n# TYPE fpm_relay_received_messages counter\nfpm_relay_received_messages_total 5\nfpm_relay_received_messages_created 1.7e9\n# HELP fpm_build Version.\n# TYPE fpm_build info\nfpm_build_info{version=\"0.1.0\"} 1\n# TYPE lat histogram\n# UNIT lat seconds\nlat_bucket{le=\"+Inf\"} 1 # {id=\"x\"} 0.5\nlat_sum 0.5\nlat_count 1\n# EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP fpm_relay_received_messages_total Messages.\n# TYPE fpm_relay_received_messages_total counter\nfpm_relay_received_messages_total 5\n# HELP fpm_build_info Version.\n# TYPE fpm_build_info gauge\nfpm_build_info{version=\"0.1.0\"} 1\n# TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 1\nlat_sum 0.5\nlat_count 1\n"
        );
    }

    /// An engine that answers OpenMetrics although the text format was asked for: rewritten
    /// like the relay's own families, then filtered.
    #[test]
    fn an_openmetrics_engine_answer_is_merged_as_text() {
        let om = "# HELP sglang:x Help.\n# TYPE sglang:x counter\nsglang:x_total{a=\"b\"} 1 # {t=\"1\"} 1\nsglang:x_created{a=\"b\"} 1.7e9\n# HELP other Other.\n# TYPE other gauge\nother 1\n# EOF\n";
        let text = openmetrics_to_text(om);
        let mut f = Families::default();
        assert_eq!(f.add(&text, &prefixes(), &HashSet::new(), false), 0);
        let mut out = String::new();
        f.write(&mut out);
        assert_eq!(
            out,
            "# HELP sglang:x_total Help.\n# TYPE sglang:x_total counter\nsglang:x_total{a=\"b\"} 1\n"
        );
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            check_url("http://127.0.0.1:30000/metrics").unwrap(),
            ("127.0.0.1:30000".into(), "/metrics".into())
        );
        assert_eq!(
            check_url("http://h/m?x=1").unwrap(),
            ("h:80".into(), "/m?x=1".into())
        );
        for bad in [
            "https://h/metrics",
            "127.0.0.1:30000",
            "http:///x",
            "not a url",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever an engine sends, filtering never panics, and what it keeps is itself
        /// valid exposition text made of the engine's own lines.
        #[test]
        fn arbitrary_engine_text(lines in proptest::collection::vec("(# (HELP|TYPE|UNIT) )?(sglang:|vllm:|x)[a-z_]{0,6}(\\{[a-z]{1,3}=\"[a-z #{}\\\\\"]{0,4}\"\\})? ?[0-9.eE+-]{0,5}", 0..20)) {
            let body = lines.join("\n");
            let mut f = Families::default();
            if valid_exposition(&body) {
                f.add(&body, &prefixes(), &HashSet::new(), false);
                let mut out = String::new();
                f.write(&mut out);
                proptest::prop_assert!(valid_exposition(&out), "{}", out);
                for l in out.lines() {
                    proptest::prop_assert!(body.lines().any(|b| b == l), "{} not from the engine", l);
                }
            }
        }
    }
}
