//! Which FPM subjects to subscribe to: namespace, component and endpoint, each a name or the
//! wildcard `*`, in endpoint scope (Dynamo 1.6.1), component scope (older releases) or both.

use std::fmt;

use fpm_schema::{Name, FPM_TOPIC};

/// Which subject layouts to subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ScopeFilter {
    /// `namespace.{ns}.component.{c}.endpoint.{e}.forward-pass-metrics` (Dynamo 1.6.1).
    #[default]
    Endpoint,
    /// `namespace.{ns}.component.{c}.forward-pass-metrics` (older Dynamo releases).
    Component,
    /// Both layouts (two NATS subscriptions).
    Any,
}

/// One subject segment: a validated name or `*` (any).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Any name.
    Any,
    /// Exactly this name.
    Exact(Name),
}

impl Segment {
    /// Parses `*` or a valid name; `what` names the flag for the error.
    ///
    /// # Errors
    /// A message naming the segment and what is wrong.
    pub fn parse(what: &'static str, s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Segment::Any);
        }
        Name::new(what, s)
            .map(Segment::Exact)
            .map_err(|e| format!("{e} (use a name or `*`)"))
    }

    fn as_str(&self) -> &str {
        match self {
            Segment::Any => "*",
            Segment::Exact(n) => n.as_str(),
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Segment::Any => true,
            Segment::Exact(n) => n.as_str() == s,
        }
    }
}

/// What to subscribe to.
///
/// ```
/// use fpm_subscriber::{SubjectFilter, ScopeFilter};
/// let f = SubjectFilter::parse("dynamo", "*", "generate", ScopeFilter::Endpoint).unwrap();
/// assert_eq!(f.nats_subjects(), ["namespace.dynamo.component.*.endpoint.generate.forward-pass-metrics"]);
/// let src = f.source_of("namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics").unwrap();
/// assert_eq!((src.namespace.as_str(), src.component.as_str(), src.endpoint.as_deref()), ("dynamo", "backend", Some("generate")));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectFilter {
    /// The namespace.
    pub namespace: Segment,
    /// The component.
    pub component: Segment,
    /// The endpoint (endpoint scope only).
    pub endpoint: Segment,
    /// Which layouts.
    pub scope: ScopeFilter,
}

/// Where a message came from, read off its subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// Dynamo namespace.
    pub namespace: String,
    /// Dynamo component.
    pub component: String,
    /// Dynamo endpoint; `None` for a component-scoped subject.
    pub endpoint: Option<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.component)?;
        if let Some(e) = &self.endpoint {
            write!(f, "/{e}")?;
        }
        Ok(())
    }
}

impl SubjectFilter {
    /// Parses the three segments (`*` for any).
    ///
    /// # Errors
    /// A message naming the invalid segment.
    pub fn parse(
        namespace: &str,
        component: &str,
        endpoint: &str,
        scope: ScopeFilter,
    ) -> Result<Self, String> {
        Ok(SubjectFilter {
            namespace: Segment::parse("namespace", namespace)?,
            component: Segment::parse("component", component)?,
            endpoint: Segment::parse("endpoint", endpoint)?,
            scope,
        })
    }

    /// The NATS subjects to subscribe to (one per layout).
    pub fn nats_subjects(&self) -> Vec<String> {
        let endpoint = format!(
            "namespace.{}.component.{}.endpoint.{}.{FPM_TOPIC}",
            self.namespace.as_str(),
            self.component.as_str(),
            self.endpoint.as_str()
        );
        let component = format!(
            "namespace.{}.component.{}.{FPM_TOPIC}",
            self.namespace.as_str(),
            self.component.as_str()
        );
        match self.scope {
            ScopeFilter::Endpoint => vec![endpoint],
            ScopeFilter::Component => vec![component],
            ScopeFilter::Any => vec![endpoint, component],
        }
    }

    /// Reads the source off a subject this filter matches; `None` for any other subject.
    pub fn source_of(&self, subject: &str) -> Option<Source> {
        let parts: Vec<&str> = subject.split('.').collect();
        let src = match parts.as_slice() {
            ["namespace", ns, "component", c, "endpoint", e, topic]
                if *topic == FPM_TOPIC && self.scope != ScopeFilter::Component =>
            {
                self.endpoint.matches(e).then(|| Source {
                    namespace: (*ns).to_owned(),
                    component: (*c).to_owned(),
                    endpoint: Some((*e).to_owned()),
                })?
            }
            ["namespace", ns, "component", c, topic]
                if *topic == FPM_TOPIC && self.scope != ScopeFilter::Endpoint =>
            {
                Source {
                    namespace: (*ns).to_owned(),
                    component: (*c).to_owned(),
                    endpoint: None,
                }
            }
            _ => return None,
        };
        (self.namespace.matches(&src.namespace) && self.component.matches(&src.component))
            .then_some(src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_for_each_scope() {
        let f = SubjectFilter::parse("ns", "c", "e", ScopeFilter::Any).unwrap();
        assert_eq!(
            f.nats_subjects(),
            [
                "namespace.ns.component.c.endpoint.e.forward-pass-metrics",
                "namespace.ns.component.c.forward-pass-metrics"
            ]
        );
        let f = SubjectFilter::parse("*", "*", "*", ScopeFilter::Component).unwrap();
        assert_eq!(
            f.nats_subjects(),
            ["namespace.*.component.*.forward-pass-metrics"]
        );
    }

    #[test]
    fn bad_segments_are_named() {
        let e = SubjectFilter::parse("a.b", "c", "e", ScopeFilter::Endpoint).unwrap_err();
        assert!(e.contains("namespace"), "{e}");
        assert!(SubjectFilter::parse("a", ">", "e", ScopeFilter::Endpoint).is_err());
        assert!(SubjectFilter::parse("a", "c", "", ScopeFilter::Endpoint).is_err());
    }

    #[test]
    fn sources_follow_the_filter() {
        let f = SubjectFilter::parse("ns", "*", "*", ScopeFilter::Endpoint).unwrap();
        assert!(f
            .source_of("namespace.ns.component.c.forward-pass-metrics")
            .is_none());
        assert!(f
            .source_of("namespace.other.component.c.endpoint.e.forward-pass-metrics")
            .is_none());
        assert!(f
            .source_of("namespace.ns.component.c.endpoint.e.kv-events")
            .is_none());
        let s = f
            .source_of("namespace.ns.component.c.endpoint.e.forward-pass-metrics")
            .unwrap();
        assert_eq!(s.to_string(), "ns/c/e");
        let f = SubjectFilter::parse("ns", "c", "*", ScopeFilter::Any).unwrap();
        let s = f
            .source_of("namespace.ns.component.c.forward-pass-metrics")
            .unwrap();
        assert_eq!((s.to_string(), s.endpoint), ("ns/c".to_owned(), None));
    }
}
