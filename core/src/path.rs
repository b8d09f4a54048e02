//! The one rule for names that come from untrusted places (archive entries,
//! layer tars, driver requests): relative, and never climbing with `..`.
//!
//! Callers say what the name was in their own words; this module only
//! decides. Resolution beneath a real directory (links included) is the
//! host's job, with `openat2(RESOLVE_BENEATH)`.

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsafe {
    Absolute,
    /// A `..` component.
    Climbs,
}

/// The components of `raw`, dropping empty ones and `.`; refuses absolute
/// names and `..`.
pub fn components(raw: &str) -> Result<Vec<&str>, Unsafe> {
    if raw.starts_with('/') {
        return Err(Unsafe::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Unsafe::Climbs),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_absolute_and_climbing_names() {
        assert_eq!(components("./a//b/."), Ok(vec!["a", "b"]));
        assert_eq!(components("/etc"), Err(Unsafe::Absolute));
        assert_eq!(components("a/../b"), Err(Unsafe::Climbs));
        assert_eq!(components(""), Ok(vec![]));
    }
}
