//! NATS subjects for FPM events, in Dynamo's naming.

use std::fmt;

use crate::envelope::FPM_TOPIC;
use crate::error::NameError;

/// A validated subject segment: a namespace, component or endpoint name.
///
/// Non-empty, and free of `.` (segment separator), whitespace and control characters, `*` and
/// `>` (wildcards), any of which would change what the subject matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Validates `name`; `what` says which name it is, for the error message.
    ///
    /// # Errors
    /// [`NameError`] saying what is wrong with the name.
    pub fn new(what: &'static str, name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty { what });
        }
        if let Some(found) = name
            .chars()
            .find(|&c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control())
        {
            return Err(NameError::InvalidChar { what, name, found });
        }
        Ok(Name(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which subject layout to publish on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// `namespace.{ns}.component.{c}.endpoint.{e}.forward-pass-metrics` (Dynamo 1.6.1).
    #[default]
    Endpoint,
    /// `namespace.{ns}.component.{c}.forward-pass-metrics` (older Dynamo releases).
    Component,
}

/// Where FPM events of one engine endpoint are published.
///
/// ```
/// use fpm_schema::FpmSubject;
/// let s = FpmSubject::endpoint("dynamo", "backend", "generate").unwrap();
/// assert_eq!(s.subject(), "namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics");
/// let c = FpmSubject::component("dynamo", "backend").unwrap();
/// assert_eq!(c.subject(), "namespace.dynamo.component.backend.forward-pass-metrics");
/// assert!(FpmSubject::endpoint("dy namo", "backend", "generate").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FpmSubject {
    namespace: Name,
    component: Name,
    endpoint: Option<Name>,
}

impl FpmSubject {
    /// Endpoint scope (the Dynamo 1.6.1 default).
    ///
    /// # Errors
    /// [`NameError`] for an invalid name.
    pub fn endpoint(namespace: &str, component: &str, endpoint: &str) -> Result<Self, NameError> {
        Ok(FpmSubject {
            namespace: Name::new("namespace", namespace)?,
            component: Name::new("component", component)?,
            endpoint: Some(Name::new("endpoint", endpoint)?),
        })
    }

    /// Component scope (older Dynamo releases).
    ///
    /// # Errors
    /// [`NameError`] for an invalid name.
    pub fn component(namespace: &str, component: &str) -> Result<Self, NameError> {
        Ok(FpmSubject {
            namespace: Name::new("namespace", namespace)?,
            component: Name::new("component", component)?,
            endpoint: None,
        })
    }

    /// Builds the subject for `scope`; `endpoint` is ignored for component scope.
    ///
    /// # Errors
    /// [`NameError`] for an invalid name.
    pub fn new(
        scope: Scope,
        namespace: &str,
        component: &str,
        endpoint: &str,
    ) -> Result<Self, NameError> {
        match scope {
            Scope::Endpoint => Self::endpoint(namespace, component, endpoint),
            Scope::Component => Self::component(namespace, component),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Name {
        &self.namespace
    }

    /// The component.
    pub fn component_name(&self) -> &Name {
        &self.component
    }

    /// The endpoint, for endpoint scope.
    pub fn endpoint_name(&self) -> Option<&Name> {
        self.endpoint.as_ref()
    }

    /// The scope.
    pub fn scope(&self) -> Scope {
        if self.endpoint.is_some() {
            Scope::Endpoint
        } else {
            Scope::Component
        }
    }

    /// The subject prefix without the topic (`namespace.{ns}.component.{c}[.endpoint.{e}]`),
    /// as Dynamo's discovery records call `subject_prefix`.
    pub fn prefix(&self) -> String {
        match &self.endpoint {
            Some(e) => format!(
                "namespace.{}.component.{}.endpoint.{}",
                self.namespace, self.component, e
            ),
            None => format!("namespace.{}.component.{}", self.namespace, self.component),
        }
    }

    /// The full subject, ending in `.forward-pass-metrics`.
    pub fn subject(&self) -> String {
        format!("{}.{}", self.prefix(), FPM_TOPIC)
    }
}

impl fmt::Display for FpmSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.subject())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_segments() {
        for bad in ["", "a.b", "a b", "a*", ">", "a\tb", "a\u{7f}"] {
            assert!(Name::new("namespace", bad).is_err(), "{bad:?}");
        }
        for good in ["dynamo", "vllm-worker_1", "ns-ü"] {
            assert!(Name::new("namespace", good).is_ok(), "{good:?}");
        }
        let e = FpmSubject::endpoint("ns", "a.b", "e").unwrap_err();
        assert_eq!(
            e.to_string(),
            "component name \"a.b\" contains '.': dots, spaces, `*` and `>` are not allowed in a subject segment"
        );
    }

    #[test]
    fn scopes() {
        let s = FpmSubject::new(Scope::Component, "ns", "c", "ignored").unwrap();
        assert_eq!(s.prefix(), "namespace.ns.component.c");
        assert_eq!(s.scope(), Scope::Component);
    }
}
