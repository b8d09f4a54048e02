//! A transport component that attacks the host on purpose, for the
//! trust-boundary tests. A transport has no options, so the attack is
//! picked by the repository being pulled: `attack/<mode>` (and for
//! `internal`, `attack/internal-<port>`). Every attack is one the host must
//! refuse; a mode reports success (an image that resolves) only if the
//! host let it through, which the tests treat as a failure.

gantry_kit::wit_bindgen::generate!({
    path: "../../wit",
    world: "transport-plugin",
    runtime_path: "gantry_kit::wit_bindgen::rt",
});

use exports::gantry::plugin::transport::{Endpoint, Guest, ProbeInfo, Resolved};
use gantry::plugin::http::{send, send_bytes, Request};
use gantry::plugin::types::{ByteStream, Error};

struct Bad;

fn get(url: String, headers: Vec<(String, String)>, method: &str) -> Result<(), Error> {
    send(&Request {
        method: method.into(),
        url,
        headers,
    })
    .map(|_| ())
}

/// What an attack that got through says: the pull then fails on the
/// nonsense manifest, with this text, and the test sees it.
fn breached(what: &str) -> Result<Resolved, Error> {
    Err(Error::Internal(format!("BREACH: {what}")))
}

impl Guest for Bad {
    fn probe(_ep: Endpoint) -> Result<ProbeInfo, Error> {
        Ok(ProbeInfo { version: "v2".into() })
    }

    fn resolve(ep: Endpoint, repository: String, _reference: String, _accept: Vec<String>) -> Result<Resolved, Error> {
        let mode = repository.strip_prefix("attack/").unwrap_or("");
        let base = ep.url.trim_end_matches('/').to_string();
        match mode {
            // A forged Host header: another virtual host behind the same address.
            "host-header" => {
                get(
                    format!("{base}/v2/"),
                    vec![("Host".into(), "internal.example".into())],
                    "GET",
                )?;
                breached("the Host header was sent")
            }
            // Request smuggling through framing headers.
            "transfer-encoding" => {
                get(
                    format!("{base}/v2/"),
                    vec![("Transfer-Encoding".into(), "chunked".into())],
                    "GET",
                )?;
                breached("the Transfer-Encoding header was sent")
            }
            // A write during a pull.
            "delete" => {
                get(format!("{base}/v2/{repository}/manifests/v1"), vec![], "DELETE")?;
                breached("a DELETE was sent")
            }
            // A write with a body during a pull (the push side's request).
            "put-body" => {
                send_bytes(
                    &Request {
                        method: "PUT".into(),
                        url: format!("{base}/v2/{repository}/manifests/v1"),
                        headers: vec![],
                    },
                    b"{}",
                )?;
                breached("a PUT with a body was sent")
            }
            // A body posted to the registry, not its token realm, in a pull.
            "post-body" => {
                send_bytes(
                    &Request {
                        method: "POST".into(),
                        url: format!("{base}/v2/{repository}/blobs/uploads/"),
                        headers: vec![],
                    },
                    b"x",
                )?;
                breached("a POST with a body was sent")
            }
            // Another service on the machine, not the endpoint.
            m if m.starts_with("internal-") => {
                let port = &m["internal-".len()..];
                get(format!("http://127.0.0.2:{port}/"), vec![], "GET")?;
                breached("an internal service was reached")
            }
            // Bodies opened and never closed.
            "handles" => {
                let mut kept = Vec::new();
                loop {
                    let r = send(&Request {
                        method: "GET".into(),
                        url: format!("{base}/v2/"),
                        headers: vec![],
                    })?;
                    kept.push(r.body);
                }
            }
            // A sleep inside a call.
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                breached("slept an hour")
            }
            // The credentials the core handed this endpoint, for the test to
            // see: `invalid` stops the endpoint loop there, `not-found` lets
            // it go on past a mirror.
            "credentials" => match ep.credentials {
                Some(c) => Err(Error::Invalid(format!(
                    "endpoint {} got credentials of {}",
                    ep.url, c.username
                ))),
                None => Err(Error::NotFound(format!("endpoint {} got no credentials", ep.url))),
            },
            other => Err(Error::Invalid(format!("unknown attack {other:?}"))),
        }
    }

    fn open_blob(_ep: Endpoint, _repository: String, _digest: String, _offset: u64) -> Result<ByteStream, Error> {
        Err(Error::Unsupported("the bad transport serves no blobs".into()))
    }

    fn list_tags(_ep: Endpoint, _repository: String) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }
}

export!(Bad);
