//! One retry policy for every request the core sends: pull's manifest and
//! config requests, blob and v1 layer downloads, push's uploads.
//!
//! An error is retried only when [`Error::is_transient`] says the same call
//! may succeed later (the registry said "try again", a connection dropped
//! mid-transfer, a plugin call ran past its wall-clock deadline); anything
//! else returns at once, without a wait. Between attempts the wait doubles.
//! `Unreachable` is not retried here: it is the endpoint loop's to handle
//! (falling back to the next endpoint), and a wait would only delay that.
//! This module never decides what an attempt resumes from: the caller's
//! closure keeps that state.

use crate::error::{Error, Result};
use std::time::Duration;

/// How often and how patiently a call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Retries after the first attempt (so `retries + 1` attempts in all).
    pub retries: u32,
    /// The wait before the first retry; doubled before each further one.
    pub first_wait: Duration,
}

impl Policy {
    pub const fn new(retries: u32, first_wait: Duration) -> Policy {
        Policy { retries, first_wait }
    }
}

/// Waits between attempts; tests pass one that records instead of sleeping.
pub trait Sleeper {
    fn sleep(&self, d: Duration);
}

/// The real thing: `std::thread::sleep`.
pub struct Thread;

impl Sleeper for Thread {
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// Runs `f` until it succeeds, fails permanently, or `policy.retries`
/// retries are spent; the last error is returned. `f` gets the attempt
/// number (0 for the first), so it can resume or recover on a retry.
/// `before_retry` runs after a transient failure, before the wait (for a
/// progress line).
pub fn retry<T>(
    policy: Policy,
    sleeper: &dyn Sleeper,
    mut before_retry: impl FnMut(&Error),
    mut f: impl FnMut(u32) -> Result<T>,
) -> Result<T> {
    let mut wait = policy.first_wait;
    let mut attempt = 0;
    loop {
        match f(attempt) {
            Err(e) if e.is_transient() && attempt < policy.retries => {
                before_retry(&e);
                sleeper.sleep(wait);
                wait = wait.saturating_mul(2);
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorClass, PluginError};
    use std::cell::RefCell;

    /// Records the waits instead of sleeping.
    #[derive(Default)]
    struct Recorder(RefCell<Vec<Duration>>);

    impl Sleeper for Recorder {
        fn sleep(&self, d: Duration) {
            self.0.borrow_mut().push(d);
        }
    }

    fn failing(class: ErrorClass) -> Error {
        Error::Plugin(PluginError::new(class, "no"))
    }

    const POLICY: Policy = Policy::new(3, Duration::from_millis(100));

    #[test]
    fn transient_errors_are_retried_with_doubling_waits_then_returned() {
        let sleeps = Recorder::default();
        let mut calls = Vec::new();
        let r: Result<()> = retry(
            POLICY,
            &sleeps,
            |_| {},
            |n| {
                calls.push(n);
                Err(failing(ErrorClass::Transient))
            },
        );
        assert_eq!(r.unwrap_err().class(), ErrorClass::Transient);
        assert_eq!(calls, [0, 1, 2, 3], "the first attempt and three retries");
        let ms: Vec<u128> = sleeps.0.borrow().iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400]);
    }

    #[test]
    fn a_permanent_error_returns_at_once_without_a_wait() {
        for class in [
            ErrorClass::NotFound,
            ErrorClass::Unauthorized,
            ErrorClass::Unreachable,
            ErrorClass::Unsupported,
            ErrorClass::Integrity,
        ] {
            let sleeps = Recorder::default();
            let mut calls = 0;
            let r: Result<()> = retry(
                POLICY,
                &sleeps,
                |_| panic!("no retry"),
                |_| {
                    calls += 1;
                    Err(failing(class))
                },
            );
            assert_eq!(r.unwrap_err().class(), class);
            assert_eq!(calls, 1, "{class:?}");
            assert!(sleeps.0.borrow().is_empty(), "{class:?}");
        }
        let sleeps = Recorder::default();
        let r: Result<()> = retry(
            POLICY,
            &sleeps,
            |_| {},
            |_| Err(Error::Integrity("digest mismatch".into())),
        );
        assert!(r.is_err() && sleeps.0.borrow().is_empty());
    }

    #[test]
    fn a_success_after_transient_failures_is_returned() {
        let sleeps = Recorder::default();
        let mut told = 0;
        let r = retry(
            POLICY,
            &sleeps,
            |_| told += 1,
            |n| {
                if n < 2 {
                    Err(failing(ErrorClass::TimedOut))
                } else {
                    Ok(n)
                }
            },
        );
        assert_eq!(r.unwrap(), 2);
        assert_eq!(told, 2, "told before each retry");
        assert_eq!(sleeps.0.borrow().len(), 2);
    }

    #[test]
    fn no_retries_means_one_attempt() {
        let sleeps = Recorder::default();
        let mut calls = 0;
        let r: Result<()> = retry(
            Policy::new(0, Duration::from_secs(1)),
            &sleeps,
            |_| {},
            |_| {
                calls += 1;
                Err(failing(ErrorClass::Transient))
            },
        );
        assert!(r.is_err());
        assert_eq!(calls, 1);
        assert!(sleeps.0.borrow().is_empty());
    }
}
