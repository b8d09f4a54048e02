//! Errors of the core, each with a class the caller can ask about.
//!
//! The endpoint loop decides on fallback and retry by class, never by
//! matching message text.

use std::fmt;

/// What kind of failure an error is. Plugins report one of the first eight
/// through the WIT `error` variant; the host adds `Crashed`, the core adds
/// `Integrity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    NotFound,
    Unauthorized,
    Denied,
    Unsupported,
    Unreachable,
    Transient,
    Invalid,
    Internal,
    /// The plugin trapped, ran past its CPU deadline or its memory cap.
    Crashed,
    /// The plugin call ran past its wall-clock deadline (time spent waiting
    /// counts: a caller that fed it slowly may try again).
    TimedOut,
    /// Bytes did not match the digest or size they were promised to have.
    Integrity,
}

impl ErrorClass {
    /// Whether a retry of the same call may succeed: the registry said to
    /// try again or a connection broke mid-transfer (`Transient`), or the
    /// plugin call ran past its wall-clock deadline (`TimedOut`: a retry
    /// resumes where it stopped). The one classification every retry uses
    /// ([`crate::retry`]); `Unreachable` is the endpoint loop's to handle.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorClass::Transient | ErrorClass::TimedOut)
    }
}

/// A failure reported by (or about) a plugin call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    pub class: ErrorClass,
    pub message: String,
}

impl PluginError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        PluginError {
            class,
            message: message.into(),
        }
    }

    /// Whether a retry of the same call may succeed (see [`ErrorClass::is_transient`]).
    pub fn is_transient(&self) -> bool {
        self.class.is_transient()
    }

    /// Whether the endpoint loop may try the next endpoint after this error,
    /// following Docker's rules: an endpoint that cannot be reached or does
    /// not speak the protocol is skipped; on a mirror, any registry answer
    /// (missing, refused, failing) falls back to the next endpoint too.
    pub fn allows_fallback(&self, mirror: bool) -> bool {
        match self.class {
            ErrorClass::Unreachable | ErrorClass::Unsupported => true,
            ErrorClass::NotFound | ErrorClass::Unauthorized | ErrorClass::Denied | ErrorClass::Transient => mirror,
            _ => false,
        }
    }

    /// How much this failure tells about why an endpoint loop failed, when
    /// every endpoint did: a certificate refused (by either side) says the
    /// most — more than the plain-HTTP fallback's answer that follows it —
    /// then any answer, then a connection that never opened.
    pub fn telling(&self) -> u8 {
        if self.message.to_ascii_lowercase().contains("certificate") {
            2
        } else if self.class != ErrorClass::Unreachable {
            1
        } else {
            0
        }
    }
}

/// Errors of the core's operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid reference format: {0}")]
    InvalidReference(String),
    #[error("invalid platform {0:?}: {1}")]
    InvalidPlatform(String, String),
    #[error("no matching manifest for {0} in the manifest list entries")]
    NoMatchingPlatform(String),
    #[error("{0}")]
    Plugin(#[from] PluginError),
    #[error("{0}")]
    Integrity(String),
    #[error("{0}")]
    InvalidManifest(String),
    #[error("no such image: {0}")]
    NoSuchImage(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Config(String),
    /// The store's quota would be passed.
    #[error("{0}")]
    Quota(#[from] crate::store::quota::Exceeded),
    /// Asking for a registry's credentials failed.
    #[error("error getting credentials for {host}: {message}")]
    Credentials { host: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }

    /// Whether a retry of the same call may succeed: only a plugin's
    /// passing failure; integrity, I/O and every other error are permanent.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Plugin(p) if p.is_transient())
    }

    /// See [`PluginError::telling`]; errors of the core itself are answers.
    pub fn telling(&self) -> u8 {
        match self {
            Error::Plugin(p) => p.telling(),
            _ => 1,
        }
    }

    /// Keeps `new` in `kept` when it tells at least as much: the error an
    /// endpoint loop reports once every endpoint failed.
    pub fn keep_most_telling(kept: &mut Option<Error>, new: Error) {
        if kept.as_ref().is_none_or(|k| new.telling() >= k.telling()) {
            *kept = Some(new);
        }
    }

    /// The error an endpoint loop ends with when `last` ends it: an earlier
    /// endpoint's when that one tells more (a certificate refused over
    /// HTTPS, then the plain-HTTP fallback's "400: an HTTP request to an
    /// HTTPS server").
    pub fn most_telling(earlier: Option<Error>, last: Error) -> Error {
        match earlier {
            Some(e) if e.telling() > last.telling() => e,
            _ => last,
        }
    }

    /// The class of this error, for exit codes and fallback decisions.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Plugin(p) => p.class,
            Error::Integrity(_) => ErrorClass::Integrity,
            Error::NoSuchImage(_) | Error::NoMatchingPlatform(_) => ErrorClass::NotFound,
            Error::Conflict(_) => ErrorClass::Denied,
            Error::Io { .. } => ErrorClass::Internal,
            _ => ErrorClass::Invalid,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, context: impl fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::io(context, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(class: ErrorClass, message: &str) -> Error {
        Error::Plugin(PluginError::new(class, message))
    }

    #[test]
    fn a_refused_certificate_outranks_the_plain_http_fallback_s_answer() {
        let tls = plugin(
            ErrorClass::Unreachable,
            "https://r:5443: TLS handshake with r:5443: invalid peer certificate: UnknownIssuer",
        );
        let plain = plugin(
            ErrorClass::Invalid,
            "HTTP 400: Client sent an HTTP request to an HTTPS server.",
        );
        let e = Error::most_telling(Some(tls), plain);
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        // An answer outranks a connection that never opened.
        let refused = plugin(ErrorClass::Unreachable, "https://r: connection refused");
        let answer = plugin(ErrorClass::Invalid, "HTTP 400: bad request");
        assert!(Error::most_telling(Some(refused), answer).to_string().contains("400"));
        // Of equals, the later one is kept.
        let mut kept = None;
        Error::keep_most_telling(&mut kept, plugin(ErrorClass::Unreachable, "first"));
        Error::keep_most_telling(&mut kept, plugin(ErrorClass::Unreachable, "second"));
        assert_eq!(kept.unwrap().to_string(), "second");
    }
}
