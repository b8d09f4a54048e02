//! Untrusted text in messages: file names, registry error bodies, archive
//! contents and URLs reach a terminal only escaped, on one line, with any
//! secret a URL carries (user:password@, a presigned query) taken out.
//!
//! Data keeps such text exact; only what is printed goes through here.

use std::fmt::Write as _;

/// The longest a quoted piece of untrusted text may be in a message.
pub const MAX_QUOTED: usize = 512;

/// `s` on one line with every control character escaped (`\n`, `\x1b`,
/// `\u{9b}`), so a terminal shows it and never obeys it.
pub fn escape_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_bidi_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Unicode controls that reorder text on screen (Trojan Source).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// Untrusted bytes quoted for a message: lossy UTF-8, escaped, cut to
/// [`MAX_QUOTED`] characters.
pub fn quote_bytes(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let mut cut: String = s.chars().take(MAX_QUOTED).collect();
    let more = s.chars().count() > MAX_QUOTED;
    cut = escape_line(&cut);
    if more {
        cut.push('…');
    }
    format!("\"{cut}\"")
}

/// A URL fit for a message: no `user:password@`, no query or fragment
/// (presigned URLs carry their signature there).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let path = tail.split(['?', '#']).next().unwrap_or("");
    let redacted = if tail.len() > path.len() { "?…" } else { "" };
    let mut out = String::new();
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    out.push_str(authority);
    out.push_str(path);
    out.push_str(redacted);
    escape_line(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_redacts_secrets() {
        assert_eq!(escape_line("a\nb\x1b[31mc\u{9b}"), "a\\nb\\u{1b}[31mc\\u{9b}");
        assert_eq!(escape_line("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(quote_bytes(b"\xff\n"), "\"\u{fffd}\\n\"");
        assert_eq!(quote_bytes(&[b'a'; 600]).chars().count(), MAX_QUOTED + 3);
        assert_eq!(
            redact_url("https://bob:hunter2@cdn.example/blob?X-Amz-Signature=abc#f"),
            "https://cdn.example/blob?…"
        );
        assert_eq!(redact_url("http://127.0.0.1:5000/v2/"), "http://127.0.0.1:5000/v2/");
        assert_eq!(redact_url("not a url\n"), "not a url\\n");
    }
}
