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
