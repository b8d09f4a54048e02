//! gantry-transport-v1: the legacy Docker Registry v1 pull, request for
//! request as the v1 registry served it (seed 003): `/v1/_ping`,
//! `/v1/repositories/<name>/images`, `…/tags`, `/v1/images/<id>/ancestry`,
//! then each image's `json`, and its `layer` (resumed with `Range`) when
//! the core opens it.
//!
//! v1 has no content digests: the core verifies what it can (ids, the
//! ancestry's shape, sizes) and computes each layer's diffID as it applies
//! it, as Docker migrated v1 images. Off unless the config enables v1 for a
//! registry; then it is the last endpoint tried. Written against
//! `gantry-kit`'s `Transport` trait.

use gantry_kit::transport::http::{send, Request, Response};
use gantry_kit::transport::{
    basic_auth, check_repository, header, read_all, resumed_body, ByteStream, Endpoint, Error, ProbeInfo, Resolved,
    Transport, V1Image,
};

/// The most JSON one v1 answer may hold.
const MAX_JSON: usize = 1 << 20;
/// The deepest ancestry accepted (Docker's layer limit, plus one).
const MAX_ANCESTRY: usize = 129;

struct V1;

fn status_error(status: u16, what: &str) -> Error {
    let msg = format!("{what}: HTTP {status}");
    match status {
        404 => Error::NotFound(format!("{what} not found")),
        401 => Error::Unauthorized(msg),
        403 => Error::Denied(msg),
        405 | 501 => Error::Unsupported(msg),
        408 | 425 | 429 | 500..=599 => Error::Transient(msg),
        _ => Error::Internal(msg),
    }
}

/// GET with basic credentials when the registry asks for them.
fn get(ep: &Endpoint, path: &str, headers: Vec<(String, String)>) -> Result<Response, Error> {
    let url = format!("{}{path}", ep.url);
    let req = |auth: Option<String>| {
        let mut h = headers.clone();
        if let Some(a) = auth {
            h.push(("authorization".into(), a));
        }
        send(&Request {
            method: "GET".into(),
            url: url.clone(),
            headers: h,
        })
    };
    let resp = req(None)?;
    match (&ep.credentials, resp.status) {
        (Some(c), 401) => req(Some(basic_auth(c))),
        _ => Ok(resp),
    }
}

/// A JSON answer of at most [`MAX_JSON`] bytes.
fn get_json(ep: &Endpoint, path: &str, what: &str) -> Result<(Response, Vec<u8>), Error> {
    let resp = get(ep, path, Vec::new())?;
    let body = read_all(&resp.body, MAX_JSON)?;
    if resp.status != 200 {
        return Err(status_error(resp.status, what));
    }
    Ok((resp, body))
}

/// A v1 image id: 64 lowercase hex digits.
fn check_id(id: &str) -> Result<(), Error> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid v1 image id {:?}",
            &id[..id.len().min(80)]
        )))
    }
}

impl Transport for V1 {
    fn probe(ep: Endpoint) -> Result<ProbeInfo, Error> {
        let resp = get(&ep, "/v1/_ping", Vec::new())?;
        let _ = read_all(&resp.body, 4096);
        match resp.status {
            200 => Ok(ProbeInfo { version: "v1".into() }),
            s => Err(match status_error(s, "probing /v1/_ping") {
                Error::NotFound(m) => Error::Unsupported(m),
                e => e,
            }),
        }
    }

    fn resolve(ep: Endpoint, repository: String, reference: String, _accept: Vec<String>) -> Result<Resolved, Error> {
        check_repository(&repository)?;
        if reference.starts_with("sha256:") {
            return Err(Error::Unsupported("a v1 registry cannot pull by digest".into()));
        }
        // The requests a v1 client makes, in its order.
        let (_, _) = get_json(&ep, "/v1/_ping", "v1 ping")?;
        let (_, _) = get_json(
            &ep,
            &format!("/v1/repositories/{repository}/images"),
            &format!("images of {repository}"),
        )?;
        let (_, tags) = get_json(
            &ep,
            &format!("/v1/repositories/{repository}/tags"),
            &format!("tags of {repository}"),
        )?;
        let tags: serde_json::Value =
            serde_json::from_slice(&tags).map_err(|e| Error::Invalid(format!("tag list is not JSON: {e}")))?;
        let id = tags
            .get(&reference)
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::NotFound(format!("tag {reference} of {repository} not found")))?
            .to_string();
        check_id(&id)?;
        let (_, ancestry) = get_json(&ep, &format!("/v1/images/{id}/ancestry"), &format!("ancestry of {id}"))?;
        let ancestry: Vec<String> = serde_json::from_slice(&ancestry)
            .map_err(|e| Error::Invalid(format!("ancestry of {id} is not a list of ids: {e}")))?;
        if ancestry.len() > MAX_ANCESTRY {
            return Err(Error::Invalid(format!(
                "ancestry of {id} has {} images",
                ancestry.len()
            )));
        }
        // Oldest first, as a v1 client asks; returned image first.
        let mut chain = Vec::with_capacity(ancestry.len());
        for a in ancestry.iter().rev() {
            check_id(a)?;
            let (_, json) = get_json(&ep, &format!("/v1/images/{a}/json"), &format!("image {a}"))?;
            chain.push(V1Image { id: a.clone(), json });
        }
        chain.reverse();
        Ok(Resolved::V1Chain(chain))
    }

    /// `digest` is a v1 image id here: its layer. The size the registry
    /// gave with the image's JSON (`X-Docker-Size`) must be the layer's:
    /// the answer's length is checked against it (the host enforces that
    /// length on the stream).
    fn open_blob(ep: Endpoint, repository: String, digest: String, offset: u64) -> Result<ByteStream, Error> {
        check_repository(&repository)?;
        check_id(&digest)?;
        let (json, _) = get_json(&ep, &format!("/v1/images/{digest}/json"), &format!("image {digest}"))?;
        let promised = header(&json, "x-docker-size").and_then(|s| s.trim().parse::<u64>().ok());
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push(("range".into(), format!("bytes={offset}-")));
        }
        let resp = get(&ep, &format!("/v1/images/{digest}/layer"), headers)?;
        if let (Some(size), Some(len)) = (
            promised,
            header(&resp, "content-length").and_then(|s| s.trim().parse::<u64>().ok()),
        ) {
            if matches!(resp.status, 200 | 206) && len + offset != size {
                return Err(Error::Invalid(format!(
                    "layer {digest} is {} bytes, its image said {size} (X-Docker-Size)",
                    len + offset
                )));
            }
        }
        let what = format!("layer {digest}");
        match resumed_body(resp, offset, &what)? {
            Ok(body) => Ok(body),
            Err(resp) => Err(status_error(resp.status, &what)),
        }
    }

    fn list_tags(ep: Endpoint, repository: String) -> Result<Vec<String>, Error> {
        check_repository(&repository)?;
        let (_, body) = get_json(&ep, &format!("/v1/repositories/{repository}/tags"), "tags")?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Error::Invalid(format!("tag list is not JSON: {e}")))?;
        let mut tags: Vec<String> = v.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
        tags.sort();
        Ok(tags)
    }
}

gantry_kit::export_transport!(V1);
