//! Content digests (`sha256:<hex>`) and the chain IDs derived from diffIDs.
//!
//! The engine accepts only sha256 (`str::parse`): it is what Docker's image
//! IDs, diffIDs and chain IDs are, and what every pull, load and save names
//! content by. A registry stores whatever its clients name, so
//! [`Digest::parse_any`] also takes `sha512:` (OCI's other registered
//! algorithm) and [`Hasher`] computes either: a digest we can compute is a
//! digest we can verify.

use crate::error::{Error, Result};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// A validated digest: `sha256:` and 64 lowercase hex digits, or (from
/// [`Digest::parse_any`] or a sha512 [`Hasher`]) `sha512:` and 128. Its hex
/// part is safe to use as a file name, and the two lengths never collide.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker's 12-digit short ID.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    /// The chain ID of a layer: its diffID for the base layer, otherwise
    /// `sha256(parent_chain_id + " " + diff_id)`.
    pub fn chain(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
        match parent {
            None => diff_id.clone(),
            Some(p) => Digest::of(format!("{} {}", p, diff_id).as_bytes()),
        }
    }

    /// The chain IDs of a stack of diffIDs, base first.
    pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
        for d in diff_ids {
            let c = Digest::chain(out.last(), d);
            out.push(c);
        }
        out
    }
}

/// A digest algorithm OCI registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A running hash of either algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(a: Algorithm) -> Hasher {
        match a {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything so far.
    pub fn digest(&self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_hasher(h.clone()),
            Hasher::Sha512(h) => Digest(format!("sha512:{}", hex::encode(h.clone().finalize()))),
        }
    }
}

impl Digest {
    /// A `sha256:` or `sha512:` digest, as a registry takes them.
    pub fn parse_any(s: &str) -> Result<Digest> {
        let (algorithm, hex) = match s.split_once(':') {
            Some(("sha256", hex)) => (Algorithm::Sha256, hex),
            Some(("sha512", hex)) => (Algorithm::Sha512, hex),
            _ => {
                return Err(Error::Integrity(format!(
                    "unsupported digest {s:?}: only sha256 and sha512 are accepted"
                )))
            }
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::Integrity(format!("invalid digest {s:?}")));
        }
        Ok(Digest(s.to_string()))
    }

    pub fn algorithm(&self) -> Algorithm {
        if self.0.starts_with("sha512:") {
            Algorithm::Sha512
        } else {
            Algorithm::Sha256
        }
    }

    /// The digest of `bytes` by algorithm `a`.
    pub fn of_with(a: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(a);
        h.update(bytes);
        h.digest()
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Digest> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::Integrity(format!("unsupported digest {s:?}: only sha256 is accepted")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(Error::Integrity(format!("invalid digest {s:?}")));
        }
        Ok(Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_malformed_digests() {
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!("md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>().is_err());
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(upper.parse::<Digest>().is_err());
        let bad_path = format!("sha256:../{}", "a".repeat(61));
        assert!(bad_path.parse::<Digest>().is_err());
    }

    #[test]
    fn a_registry_takes_sha512_and_the_engine_does_not() {
        let d = Digest::of_with(Algorithm::Sha512, b"");
        assert_eq!(
            d.as_str(),
            "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
        assert_eq!(Digest::parse_any(d.as_str()).unwrap(), d);
        assert_eq!(d.algorithm(), Algorithm::Sha512);
        assert!(d.as_str().parse::<Digest>().is_err(), "the engine's parse stays sha256");
        let short = format!("sha512:{}", "a".repeat(64));
        assert!(Digest::parse_any(&short).is_err());
        assert!(Digest::parse_any("sha384:00").is_err());
        let s = Digest::of(b"x");
        assert_eq!(Digest::parse_any(s.as_str()).unwrap(), s);
        assert_eq!(Digest::of_with(Algorithm::Sha256, b"x"), s);
    }

    #[test]
    fn chain_ids_follow_docker() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let ids = Digest::chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
    }
}
