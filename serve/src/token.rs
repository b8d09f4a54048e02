//! Bearer tokens as distribution's `auth.token` checks them: a client
//! without one (or without the scope a request needs) gets 401 and a
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…` challenge, fetches
//! a JWT from the realm (the token server decides what it may do), and
//! sends it back. The registry trusts the issuer's certificates (a PEM
//! bundle, distribution's `rootcertbundle`): a token must be signed by the
//! key of one of them, name the configured issuer and service, be within
//! its validity, and grant `repository:NAME:pull|push|delete` (or
//! `registry:catalog:*`) for what it is used for.
//!
//! The JWS is checked here rather than with a JWT crate: the signature
//! itself is verified by rustls-webpki (already what TLS verifies with)
//! against the certificate's own key, which the JWT crates cannot take
//! from a certificate; what is left — base64url, three JSON fields, a
//! fixed list of algorithms, ECDSA's `r||s` as DER — is a few lines, and
//! `alg: none` or an HMAC algorithm (a public key used as a shared secret)
//! can never be accepted because only signature algorithms are listed.
//! A token whose `x5c` header names a certificate is accepted only when
//! that certificate is itself in the bundle; chains up to a bundle CA are
//! not followed.

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use webpki::ring as algs;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY: u64 = 60;
/// The longest token looked at.
const MAX_TOKEN: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("reading the token certificates {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("the token realm {0:?} is not an http:// or https:// URL")]
    Realm(String),
}

/// Why a token was not taken (said in the 401's message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("authentication required")]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("the token's signature is not from a trusted issuer key")]
    Signature,
    #[error("the token is from another issuer")]
    Issuer,
    #[error("the token is for another service")]
    Audience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYet,
    #[error("the token does not grant {0}")]
    Scope(String),
}

/// What a request needs: `repository:NAME:ACTION` or `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: &'static str,
    pub name: String,
    pub action: &'static str,
}

impl Scope {
    pub fn repository(name: &str, action: &'static str) -> Scope {
        Scope {
            kind: "repository",
            name: name.to_string(),
            action,
        }
    }

    pub fn catalog() -> Scope {
        Scope {
            kind: "registry",
            name: "catalog".into(),
            action: "*",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.kind, self.name, self.action)
    }
}

/// The token check a registry was configured with.
pub struct TokenAuth {
    realm: String,
    service: String,
    issuer: String,
    certs: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("realm", &self.realm)
            .field("service", &self.service)
            .field("issuer", &self.issuer)
            .field("certs", &self.certs.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    x5c: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(default)]
    access: Vec<Grant>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
struct Grant {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    actions: Vec<String>,
}

impl TokenAuth {
    /// Trusts tokens `issuer` signs for `service` with the key of a
    /// certificate in `certs` (PEM), sending clients to `realm` for them.
    pub fn load(realm: &str, service: &str, issuer: &str, certs: &Path) -> Result<TokenAuth, TokenConfigError> {
        if !(realm.starts_with("https://") || realm.starts_with("http://")) || realm.contains('"') {
            return Err(TokenConfigError::Realm(realm.to_string()));
        }
        let err = |reason: String| TokenConfigError::Certs {
            path: certs.to_path_buf(),
            reason,
        };
        let list = gantry_http::trust::pem_certificates(certs).map_err(err)?;
        for c in &list {
            webpki::EndEntityCert::try_from(c).map_err(|e| err(format!("a certificate does not parse: {e}")))?;
        }
        Ok(TokenAuth {
            realm: realm.to_string(),
            service: service.to_string(),
            issuer: issuer.to_string(),
            certs: list,
        })
    }

    /// The `WWW-Authenticate` value of a 401 for `scope` (scopes as a
    /// challenge names them: `repository:a:pull,push`, space-separated).
    pub fn challenge(&self, scope: Option<&str>, insufficient: bool) -> String {
        let mut c = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm,
            self.service.replace(['"', '\\'], "")
        );
        if let Some(s) = scope {
            // Repository names are of the distribution grammar: no quotes.
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }

    /// Checks the `Authorization` header against every scope of `need`
    /// (none: any valid token), at `now` (seconds since the epoch); the
    /// token's subject (`sub`, at most 256 bytes), when it names one.
    pub fn check(&self, authorization: Option<&str>, need: &[Scope], now: u64) -> Result<Option<String>, TokenError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(TokenError::Missing)?;
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed("too long"));
        }
        let claims = self.verify(token)?;
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(TokenError::Issuer);
        }
        let for_us = match &claims.aud {
            Some(Audience::One(a)) => *a == self.service,
            Some(Audience::Many(l)) => l.contains(&self.service),
            None => false,
        };
        if !for_us {
            return Err(TokenError::Audience);
        }
        match claims.exp {
            Some(exp) if now <= exp.saturating_add(LEEWAY) => {}
            _ => return Err(TokenError::Expired),
        }
        if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(LEEWAY)) {
            return Err(TokenError::NotYet);
        }
        for s in need {
            let granted = claims
                .access
                .iter()
                .any(|g| g.kind == s.kind && g.name == s.name && g.actions.iter().any(|a| a == s.action || a == "*"));
            if !granted {
                return Err(TokenError::Scope(s.to_string()));
            }
        }
        Ok(claims.sub.filter(|s| !s.is_empty() && s.len() <= 256))
    }

    /// The claims of `token` once its signature checks out.
    fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed("not three parts"));
        };
        let b64 = |x: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(x.trim_end_matches('='))
                .map_err(|_| TokenError::Malformed("not base64url"))
        };
        let header: Header =
            serde_json::from_slice(&b64(h)?).map_err(|_| TokenError::Malformed("a header that is not JSON"))?;
        let signature = b64(s)?;
        let (alg, signature): (&dyn rustls_pki_types::SignatureVerificationAlgorithm, Vec<u8>) =
            match header.alg.as_str() {
                "ES256" => (algs::ECDSA_P256_SHA256, ecdsa_der(&signature, 32)?),
                "ES384" => (algs::ECDSA_P384_SHA384, ecdsa_der(&signature, 48)?),
                "RS256" => (algs::RSA_PKCS1_2048_8192_SHA256, signature),
                "RS384" => (algs::RSA_PKCS1_2048_8192_SHA384, signature),
                "RS512" => (algs::RSA_PKCS1_2048_8192_SHA512, signature),
                "PS256" => (algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY, signature),
                "PS384" => (algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY, signature),
                "PS512" => (algs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY, signature),
                "EdDSA" => (algs::ED25519, signature),
                other => return Err(TokenError::Algorithm(other.chars().take(16).collect())),
            };
        // A token naming its certificate must name one of ours.
        let named = match header.x5c.first() {
            Some(leaf) => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(leaf)
                    .map_err(|_| TokenError::Malformed("an x5c that is not base64"))?;
                Some(der)
            }
            None => None,
        };
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let ok = self
            .certs
            .iter()
            .filter(|c| named.as_deref().is_none_or(|n| n == c.as_ref()))
            .filter_map(|c| webpki::EndEntityCert::try_from(c).ok())
            .any(|c| c.verify_signature(alg, signed, &signature).is_ok());
        if !ok {
            return Err(TokenError::Signature);
        }
        serde_json::from_slice(&b64(p)?).map_err(|_| TokenError::Malformed("claims that are not JSON"))
    }
}

/// A JWS ECDSA signature (`r || s`, `n` bytes each) as the DER
/// `SEQUENCE { INTEGER r, INTEGER s }` webpki verifies.
fn ecdsa_der(sig: &[u8], n: usize) -> Result<Vec<u8>, TokenError> {
    if sig.len() != 2 * n {
        return Err(TokenError::Malformed("an ECDSA signature of the wrong length"));
    }
    let int = |x: &[u8]| {
        let mut x = x;
        while x.len() > 1 && x[0] == 0 {
            x = &x[1..];
        }
        let mut v = vec![0x02];
        let pad = x[0] & 0x80 != 0;
        v.push((x.len() + pad as usize) as u8);
        if pad {
            v.push(0);
        }
        v.extend_from_slice(x);
        v
    };
    let (r, s) = (int(&sig[..n]), int(&sig[n..]));
    let mut out = vec![0x30];
    let len = r.len() + s.len();
    if len >= 0x80 {
        out.push(0x81);
    }
    out.push(len as u8);
    out.extend(r);
    out.extend(s);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_become_der_integers() {
        let mut sig = vec![0u8; 64];
        sig[0] = 0x80; // r needs a leading zero to stay positive
        sig[63] = 1; // s is 1
        let der = ecdsa_der(&sig, 32).unwrap();
        assert_eq!(&der[..4], &[0x30, 2 + 33 + 3, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[der.len() - 3..], &[0x02, 1, 1]);
        assert!(ecdsa_der(&sig[..63], 32).is_err());
    }

    #[test]
    fn scopes_print_as_challenges_name_them() {
        assert_eq!(Scope::repository("a/b", "pull").to_string(), "repository:a/b:pull");
        assert_eq!(Scope::catalog().to_string(), "registry:catalog:*");
    }
}
