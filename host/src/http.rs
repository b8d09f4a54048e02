//! Outgoing HTTP for transport plugins: the call-scoped client of
//! [`gantry_http::policy`] (methods, headers, origins, every hop by the
//! core's hop policy, redirects, realm learning), whose refusals and
//! failures reach the guest as the contract's errors.
//!
//! The client itself lives in `gantry-http`, beside the registry mirror's
//! upstream requests, so both go through one outbound stack and policy.

use crate::plugin::bindings::WitError;
pub use gantry_http::policy::{Access, CallScope, HttpPolicy, HttpResponse, PolicyError};

impl From<PolicyError> for WitError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Denied(m) => WitError::Denied(m),
            PolicyError::Invalid(m) => WitError::Invalid(m),
            PolicyError::Transient(m) => WitError::Transient(m),
            PolicyError::Unreachable(m) => WitError::Unreachable(m),
        }
    }
}
