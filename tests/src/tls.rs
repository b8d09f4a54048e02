//! A certificate authority of the test's own, made with the `openssl` CLI,
//! so a registry can serve HTTPS under a name and a CA no machine trusts:
//! what a company's internal registry looks like to gantry.
//!
//! Every certificate is X.509 v3 with the extensions strict verifiers
//! want (Go's crypto/tls in docker-registry and skopeo, rustls/webpki in
//! gantry): the CA has `basicConstraints CA:TRUE` and `keyCertSign`; a
//! server certificate has its names as subjectAltName and
//! `extendedKeyUsage serverAuth`; a client certificate `clientAuth`. Keys
//! are P-256, PKCS#8 PEM, unencrypted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static SERIAL: AtomicUsize = AtomicUsize::new(1);

/// A CA: its own directory (inside the directory it was made in) holds its
/// certificate, its key and every certificate it signs.
pub struct TestCa {
    dir: PathBuf,
    name: String,
}

/// A number no other certificate of this process has (serials, file
/// names), with the process id and the time in it so that two test
/// processes differ too.
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:x}{:08x}{:04x}",
        SERIAL.fetch_add(1, Ordering::Relaxed),
        nanos,
        std::process::id() & 0xffff
    )
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `req` config: no system `openssl.cnf` is read, so its defaults
/// (extensions added to every `-x509`) cannot differ between machines.
const REQ_CONFIG: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n";

impl TestCa {
    /// A new CA in a fresh subdirectory of `dir`. Two CAs never trust each
    /// other's certificates.
    pub fn new(dir: &Path) -> TestCa {
        let name = unique();
        let dir = dir.join(format!("ca-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("req.cnf"), REQ_CONFIG).unwrap();
        // The CA's own extensions, in a section `req -x509` is pointed at.
        std::fs::write(
            dir.join("ca-req.cnf"),
            format!(
                "{REQ_CONFIG}[v3]\n\
                 basicConstraints = critical, CA:TRUE\n\
                 keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n\
                 subjectKeyIdentifier = hash\n"
            ),
        )
        .unwrap();
        let subj = format!("/O=gantry tests/CN=gantry test CA {name}");
        let serial = format!("0x{}", unique());
        openssl(
            &[
                "req",
                "-x509",
                "-config",
                "ca-req.cnf",
                "-extensions",
                "v3",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3",
                "-subj",
                &subj,
                "-set_serial",
                &serial,
            ],
            &dir,
        );
        TestCa { dir, name }
    }

    /// The CA's certificate (PEM): what a client must trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A certificate for a server known as `dns_names` and `ip_addrs`
    /// (all in subjectAltName; the first name, or address, is the CN too):
    /// `(certificate, key)`, both PEM.
    pub fn server_cert(&self, dns_names: &[&str], ip_addrs: &[&str]) -> (PathBuf, PathBuf) {
        let mut san: Vec<String> = dns_names.iter().map(|n| format!("DNS:{n}")).collect();
        san.extend(ip_addrs.iter().map(|a| format!("IP:{a}")));
        assert!(!san.is_empty(), "a server certificate needs a name");
        let cn = dns_names.first().or(ip_addrs.first()).unwrap();
        self.sign(
            "server",
            cn,
            &format!(
                "keyUsage = critical, digitalSignature\n\
                 extendedKeyUsage = serverAuth\n\
                 subjectAltName = {}\n",
                san.join(", ")
            ),
        )
    }

    /// A certificate for a client called `cn`, for mutual TLS:
    /// `(certificate, key)`, both PEM.
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.sign(
            "client",
            cn,
            "keyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n",
        )
    }

    /// A new key and a certificate for it signed by this CA, with
    /// `extensions` (an `openssl x509 -extfile` body) besides the ones
    /// every leaf has.
    fn sign(&self, kind: &str, cn: &str, extensions: &str) -> (PathBuf, PathBuf) {
        let id = unique();
        let (key, csr, crt, ext) = (
            format!("{kind}-{id}.key"),
            format!("{kind}-{id}.csr"),
            format!("{kind}-{id}.crt"),
            format!("{kind}-{id}.ext"),
        );
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "basicConstraints = critical, CA:FALSE\n\
                 subjectKeyIdentifier = hash\n\
                 authorityKeyIdentifier = keyid, issuer\n\
                 {extensions}"
            ),
        )
        .unwrap();
        openssl(
            &[
                "req",
                "-new",
                "-config",
                "req.cnf",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/O=gantry tests/CN={cn}"),
            ],
            &self.dir,
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("0x{}", unique()),
                "-days",
                "2",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
            &self.dir,
        );
        (self.dir.join(crt), self.dir.join(key))
    }

    /// A name telling this CA from others (in its subject).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Writes one registry's directory of a Docker/containers `certs.d` tree:
/// `base/<host_port>/` with `ca.crt` (when `ca` is given) and
/// `client.cert` + `client.key` (when `client` is given). Returns `base`,
/// the value of a `certs_dirs` entry.
pub fn certs_d(base: &Path, host_port: &str, ca: Option<&Path>, client: Option<(&Path, &Path)>) -> PathBuf {
    let dir = base.join(host_port);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(ca) = ca {
        std::fs::copy(ca, dir.join("ca.crt")).unwrap();
    }
    if let Some((cert, key)) = client {
        std::fs::copy(cert, dir.join("client.cert")).unwrap();
        std::fs::copy(key, dir.join("client.key")).unwrap();
    }
    base.to_path_buf()
}
