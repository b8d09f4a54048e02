//! Platforms (`os/arch[/variant]`), the host's default, and matching against
//! the entries of a manifest list or OCI index.

use crate::error::{Error, Result};
use std::fmt;

const KNOWN_OS: &[&str] = &[
    "linux",
    "windows",
    "darwin",
    "freebsd",
    "netbsd",
    "openbsd",
    "solaris",
    "illumos",
    "aix",
    "plan9",
    "android",
    "ios",
    "dragonfly",
    "js",
    "wasip1",
];
const KNOWN_ARCH: &[&str] = &[
    "amd64", "386", "arm", "arm64", "ppc64le", "ppc64", "s390x", "riscv64", "mips", "mipsle", "mips64", "mips64le",
    "loong64", "wasm",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in Go's names.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            other => other,
        };
        let variant = match arch {
            "arm64" => Some("v8".to_string()),
            _ => None,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
            variant,
        }
    }

    /// Parses `os/arch[/variant]`, normalising aliases (`x86_64`, `aarch64`).
    pub fn parse(s: &str) -> Result<Platform> {
        let bad = |why: &str| Error::InvalidPlatform(s.to_string(), why.to_string());
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad("expected os/arch[/variant]"));
        }
        let os = parts[0].to_ascii_lowercase();
        if !KNOWN_OS.contains(&os.as_str()) {
            return Err(bad("unknown operating system"));
        }
        let arch = match parts[1].to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" => "amd64".to_string(),
            "aarch64" => "arm64".to_string(),
            "i386" => "386".to_string(),
            a => a.to_string(),
        };
        if !KNOWN_ARCH.contains(&arch.as_str()) {
            return Err(bad("unknown architecture"));
        }
        let mut variant = parts.get(2).map(|v| v.to_ascii_lowercase());
        if arch == "arm64" && variant.is_none() {
            variant = Some("v8".to_string());
        }
        Ok(Platform { os, arch, variant })
    }

    /// Whether an entry of a manifest list with these fields fits this platform.
    /// A missing variant in the entry matches, as in containerd's matcher.
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.arch != arch {
            return false;
        }
        match (self.variant.as_deref(), variant) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(Platform::parse("linux/amd64").unwrap().to_string(), "linux/amd64");
        assert_eq!(Platform::parse("linux/aarch64").unwrap().to_string(), "linux/arm64/v8");
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().to_string(), "linux/arm/v7");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("plan10/amd64").is_err());
        assert!(Platform::parse("linux/z80").is_err());
    }

    #[test]
    fn missing_variant_matches() {
        let p = Platform::parse("linux/arm64").unwrap();
        assert!(p.matches("linux", "arm64", None));
        assert!(p.matches("linux", "arm64", Some("v8")));
        assert!(!p.matches("linux", "arm", Some("v8")));
    }
}
