//! Query parameters and path segments as the servers read them: one
//! decoding (`application/x-www-form-urlencoded` for queries, `%XX` for
//! path segments, invalid UTF-8 replaced), on the `form_urlencoded` and
//! `percent-encoding` crates.

use std::borrow::Cow;

/// The first value of query parameter `key` in `query` (decoded).
pub fn value(query: Option<&str>, key: &str) -> Option<String> {
    pairs(query).find_map(|(k, v)| (k == key).then(|| v.into_owned()))
}

/// Every value of a repeated query parameter, in order.
pub fn values(query: Option<&str>, key: &str) -> Vec<String> {
    pairs(query)
        .filter_map(|(k, v)| (k == key).then(|| v.into_owned()))
        .collect()
}

/// Every (name, value) pair of `query`, decoded.
pub fn pairs(query: Option<&str>) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
}

/// A request's query parameter `key`.
pub fn param<B>(req: &hyper::Request<B>, key: &str) -> Option<String> {
    value(req.uri().query(), key)
}

/// Every value of a request's repeated query parameter `key`.
pub fn params<B>(req: &hyper::Request<B>, key: &str) -> Vec<String> {
    values(req.uri().query(), key)
}

/// Decodes the `%XX` escapes of a path segment (`+` stays); a malformed
/// escape stays as it is.
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_segments_decode() {
        let q = Some("tag=v%201&x&tag=a+b&digest=sha256%3Aab&bad=%zz&end=100%");
        assert_eq!(value(q, "tag").as_deref(), Some("v 1"));
        assert_eq!(values(q, "tag"), ["v 1", "a b"]);
        assert_eq!(value(q, "x").as_deref(), Some(""));
        assert_eq!(value(q, "digest").as_deref(), Some("sha256:ab"));
        assert_eq!(value(q, "bad").as_deref(), Some("%zz"));
        assert_eq!(value(q, "end").as_deref(), Some("100%"));
        assert_eq!(value(q, "none"), None);
        assert_eq!(value(None, "tag"), None);
        assert_eq!(percent_decode("docker.io%2Flibrary%2Fbar"), "docker.io/library/bar");
        assert_eq!(percent_decode("a+b%zz"), "a+b%zz");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
