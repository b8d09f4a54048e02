//! gantry-kit: what a gantry plugin author needs on the guest side, and
//! the only dependency a plugin needs.
//!
//! - [`driver`]: the [`driver::Driver`] trait (a default for every method)
//!   and [`export_driver!`]; [`transport`]: [`transport::Transport`] and
//!   [`export_transport!`]. Their bindings are generated from the WIT that
//!   ships inside this crate (`wit/`, the contract; released versions frozen
//!   under `wit/since_v<version>/`), so a plugin outside this repository
//!   builds with `cargo build --target wasm32-wasip2` alone.
//! - `wit_bindgen`, re-exported, for a plugin that generates its own
//!   bindings (say, against a frozen older contract).
//! - Small helpers every transport needs.
//!
//! It must never grow host-side code: plugins depend on the kit only, never
//! on the core or the host. The contract version is stamped into every
//! component by the WIT package itself (`gantry:plugin/<iface>@<version>`),
//! which the host reads before instantiating.

pub use wit_bindgen;

/// The native C ABI, for the `native` build of a driver.
#[cfg(gantry_native)]
#[doc(hidden)]
pub use gantry_native_abi as native_abi;

pub mod driver;
#[cfg(not(gantry_native))]
pub mod transport;

/// The version of the `gantry:plugin` WIT package this kit was built with.
/// Read from the WIT package line at build time.
pub const CONTRACT_VERSION: &str = env!("GANTRY_CONTRACT_VERSION");

/// Parses an HTTP authentication challenge such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`
/// into its scheme and parameters. Parameter names are lowercased. The
/// one parser the host and the registry mirror use too.
pub use gantry_challenge::parse as parse_challenge;

/// Percent-encodes a query parameter value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Standard base64 (with padding), for HTTP basic credentials.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let (s, p) = parse_challenge(r#"Bearer realm="http://127.0.0.1:1/token",service="reg, istry""#).unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p[1], ("service".into(), "reg, istry".into()));
    }

    #[test]
    fn encodes() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(query_escape("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
