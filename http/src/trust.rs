//! Which servers an outbound TLS connection trusts, and which certificate
//! it shows them: the one answer for pulls, pushes, logins and the
//! registry mirror's upstreams.
//!
//! What peers read, read the same way, so a machine set up for docker,
//! podman or curl is set up for gantry:
//! - the system trust store (`rustls-native-certs`: the distribution's CA
//!   bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` as OpenSSL-based tools
//!   read them), with the roots compiled into `webpki-roots` only where the
//!   system has none at all;
//! - per registry, Docker's and containers' `certs.d/<host[:port]>/`:
//!   every `*.crt` is a CA trusted for that registry besides the system's,
//!   every `*.cert` with the `*.key` of the same name a client certificate
//!   for mutual TLS (Docker refuses a `.cert` without its key, so do we);
//! - a registry marked `insecure` is reached over TLS without checking its
//!   certificate, as Docker's `insecure-registries` does; only that
//!   `host[:port]`, never a host it redirects to.
//!
//! Configs are built per registry on first use and kept a minute (a file
//! dropped into `certs.d` is seen by a running daemon soon after), in a
//! bounded map: the key is a host a registry may name.

use gantry_core::text::escape_line;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where Docker and containers/image keep per-registry certificates.
pub const DEFAULT_CERTS_DIRS: [&str; 2] = ["/etc/docker/certs.d", "/etc/containers/certs.d"];

/// How long a registry's config is kept before `certs.d` is read again.
const CONFIG_TTL: Duration = Duration::from_secs(60);

/// The most registries whose configs are kept at once.
const MAX_CONFIGS: usize = 64;

/// Why no TLS config could be made for a registry.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading {}: {reason}", escape_line(&path.display().to_string()))]
    Read { path: PathBuf, reason: String },
    #[error("client certificate {} has no key {}", escape_line(&cert.display().to_string()), escape_line(&key.display().to_string()))]
    MissingKey { cert: PathBuf, key: PathBuf },
    #[error("client certificate {}: {reason}", escape_line(&cert.display().to_string()))]
    ClientCert { cert: PathBuf, reason: String },
    #[error("the system trust store: {0}")]
    System(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The trust settings of every outbound connection.
pub struct Trust {
    certs_dirs: Vec<PathBuf>,
    /// `host[:port]` of registries whose certificates are not verified.
    insecure: BTreeSet<String>,
    provider: Arc<CryptoProvider>,
    /// Trusted beside the system's roots, for every host (a client's own
    /// CA bundle: `AWS_CA_BUNDLE` for the object store).
    extra: Vec<CertificateDer<'static>>,
    system: OnceLock<Result<Arc<RootCertStore>, String>>,
    /// Configs of registries with a `certs.d` entry or marked insecure.
    configs: Mutex<HashMap<String, (Arc<ClientConfig>, Instant)>>,
    /// The config of every other host.
    default: OnceLock<Arc<ClientConfig>>,
}

impl Trust {
    pub fn new(certs_dirs: Vec<PathBuf>, insecure: BTreeSet<String>) -> Trust {
        Trust {
            certs_dirs,
            insecure,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            extra: Vec::new(),
            system: OnceLock::new(),
            configs: Mutex::new(HashMap::new()),
            default: OnceLock::new(),
        }
    }

    /// The same settings, trusting `certs` too for every host.
    pub fn with_extra_roots(mut self, certs: Vec<CertificateDer<'static>>) -> Trust {
        self.extra.extend(certs);
        self
    }

    /// The TLS config for a connection to `domain` (`host[:port]`, as the
    /// config's registry tables and `certs.d` are keyed).
    pub fn config_for(&self, domain: &str) -> Result<Arc<ClientConfig>, TrustError> {
        let insecure = self.insecure.contains(domain);
        let dirs: Vec<PathBuf> = self
            .certs_dirs
            .iter()
            .map(|d| d.join(domain))
            .filter(|d| is_safe_dir_name(domain) && d.is_dir())
            .collect();
        if !insecure && dirs.is_empty() {
            if let Some(c) = self.default.get() {
                return Ok(c.clone());
            }
            let c = Arc::new(self.build(self.system()?, None, false)?);
            return Ok(self.default.get_or_init(|| c).clone());
        }
        if let Some((c, at)) = self.configs.lock().unwrap().get(domain) {
            if at.elapsed() < CONFIG_TTL {
                return Ok(c.clone());
            }
        }
        let config = Arc::new(self.for_dirs(&dirs, insecure)?);
        let mut configs = self.configs.lock().unwrap();
        if configs.len() >= MAX_CONFIGS {
            configs.clear();
        }
        configs.insert(domain.to_string(), (config.clone(), Instant::now()));
        Ok(config)
    }

    /// A config trusting the system's roots and the CAs in `dirs`, showing
    /// the client certificate found there, if any.
    fn for_dirs(&self, dirs: &[PathBuf], insecure: bool) -> Result<ClientConfig, TrustError> {
        let mut roots = if insecure {
            RootCertStore::empty()
        } else {
            (*self.system()?).clone()
        };
        let mut client = None;
        for dir in dirs {
            for path in sorted_entries(dir)? {
                match path.extension().and_then(|e| e.to_str()) {
                    Some("crt") => {
                        for cert in read_certs(&path)? {
                            roots.add(cert).map_err(|e| TrustError::Read {
                                path: path.clone(),
                                reason: e.to_string(),
                            })?;
                        }
                    }
                    Some("cert") if client.is_none() => client = Some(read_client_cert(&path)?),
                    _ => {}
                }
            }
        }
        self.build(Arc::new(roots), client, insecure)
    }

    fn build(
        &self,
        roots: Arc<RootCertStore>,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        insecure: bool,
    ) -> Result<ClientConfig, TrustError> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Tls(e.to_string()))?;
        let builder = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(self.provider.clone())))
        } else {
            builder.with_root_certificates(roots)
        };
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TrustError::Tls(e.to_string()))?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The system's roots, read once.
    fn system(&self) -> Result<Arc<RootCertStore>, TrustError> {
        self.system
            .get_or_init(|| {
                let mut roots = (*load_system_roots()?).clone();
                roots.add_parsable_certificates(self.extra.iter().cloned());
                Ok(Arc::new(roots))
            })
            .clone()
            .map_err(TrustError::System)
    }
}

/// The system trust store: `SSL_CERT_FILE` / `SSL_CERT_DIR` when set,
/// else the distribution's bundle; the compiled-in roots only when the
/// system has none.
fn load_system_roots() -> Result<Arc<RootCertStore>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    let named = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if added == 0 {
        if named {
            let why = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no certificate in SSL_CERT_FILE or SSL_CERT_DIR".into());
            return Err(escape_line(&why));
        }
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    Ok(Arc::new(roots))
}

/// A `certs.d` entry is named by the registry: never a path of its own.
fn is_safe_dir_name(domain: &str) -> bool {
    !domain.is_empty() && domain != "." && domain != ".." && !domain.contains(['/', '\0'])
}

/// The files of `dir`, by name (the first client certificate wins, as a
/// reader of the directory would expect).
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, TrustError> {
    let read = std::fs::read_dir(dir).map_err(|e| TrustError::Read {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out: Vec<PathBuf> = read.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    out.sort();
    Ok(out)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    pem_certificates(path).map_err(|reason| TrustError::Read {
        path: path.to_path_buf(),
        reason,
    })
}

/// Every PEM certificate in the file at `path` (a CA bundle, a server's
/// chain, a token issuer's certificates); an error, as the reason, when
/// it cannot be read or holds none.
pub fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(certs)
}

/// A `*.cert` and its `*.key`.
fn read_client_cert(cert: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TrustError> {
    let key = cert.with_extension("key");
    if !key.exists() {
        return Err(TrustError::MissingKey {
            cert: cert.to_path_buf(),
            key,
        });
    }
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| TrustError::ClientCert {
        cert: cert.to_path_buf(),
        reason: format!("its key: {e}"),
    })?;
    Ok((chain, key))
}

/// The verifier of an insecure registry: any certificate, but the
/// handshake's signatures still checked (the connection is still TLS).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_name_never_leaves_the_certs_directory() {
        assert!(is_safe_dir_name("reg.example:5000"));
        assert!(!is_safe_dir_name(".."));
        assert!(!is_safe_dir_name("a/../../etc"));
        assert!(!is_safe_dir_name(""));
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("r.example:5000");
        std::fs::create_dir(&reg).unwrap();
        std::fs::write(reg.join("client.cert"), "not used").unwrap();
        let t = Trust::new(vec![dir.path().to_path_buf()], BTreeSet::new());
        let e = t.config_for("r.example:5000").unwrap_err().to_string();
        assert!(e.contains("client.cert has no key") && e.contains("client.key"), "{e}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_an_error_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("r.example");
        std::fs::create_dir(&reg).unwrap();
        std::fs::write(reg.join("ca.crt"), "garbage").unwrap();
        let t = Trust::new(vec![dir.path().to_path_buf()], BTreeSet::new());
        let e = t.config_for("r.example").unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("no PEM certificate"), "{e}");
    }
}
