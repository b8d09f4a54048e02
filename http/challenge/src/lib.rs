//! `WWW-Authenticate` challenges, parsed once for every side of gantry:
//! the plugin host (which learns a call's token realm), the registry
//! mirror (which fetches its upstream's tokens) and the guest kit (whose
//! transports answer the challenge).
//!
//! A crate of its own, without dependencies, because the kit is a
//! `wasm32-wasip2` guest crate and must not pull the host's HTTP stack.
//! It is written here rather than taken from `http-auth` because that
//! crate refuses what registries send in practice (an unquoted realm URL
//! is not an RFC 7235 token), which gantry has always accepted.

/// Parses one challenge such as
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`
/// into its scheme and parameters, in order. Parameter names are
/// lowercased; a quoted value may hold commas and `\`-escapes.
pub fn parse(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(' ') {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Some((scheme.to_string(), params))
}

/// The parameters of a `Bearer` challenge (any case of the scheme);
/// `None` for another scheme or no challenge at all.
pub fn bearer(header: &str) -> Option<Vec<(String, String)>> {
    let (scheme, params) = parse(header)?;
    scheme.eq_ignore_ascii_case("bearer").then_some(params)
}

/// The value of parameter `name` (lowercase) among `params`.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let (s, p) =
            parse(r#"Bearer realm="http://127.0.0.1:1/token",service="reg, istry",scope="repository:a/b:pull""#)
                .unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(p[0], ("realm".into(), "http://127.0.0.1:1/token".into()));
        assert_eq!(p[1], ("service".into(), "reg, istry".into()));
        assert_eq!(p[2].1, "repository:a/b:pull");
        let (s, p) = parse(r#"Basic realm=Registry"#).unwrap();
        assert_eq!((s.as_str(), p[0].1.as_str()), ("Basic", "Registry"));
    }

    #[test]
    fn bearer_only_and_by_name() {
        let p = bearer(r#"bearer Realm=https://a/t, service="x\"y""#).unwrap();
        assert_eq!(param(&p, "realm"), Some("https://a/t"));
        assert_eq!(param(&p, "service"), Some("x\"y"));
        assert_eq!(param(&p, "scope"), None);
        assert!(bearer("Basic realm=x").is_none());
        assert!(bearer("").is_none());
    }
}
