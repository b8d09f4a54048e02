//! Operating `gantry serve` as platforms run a registry: HTTPS (and HTTP/2)
//! with a certificate replaced on SIGHUP without dropping a connection.

use crate::peers;
use crate::serve::skopeo;
use gantry_tests::gantry::Gantry;
use gantry_tests::image::Layout;
use gantry_tests::require;
use gantry_tests::tls::TestCa;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A directory holding only `ca` as `ca.crt`: what skopeo's and podman's
/// `--cert-dir` read.
fn trusting(dir: &Path, ca: &TestCa) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca.cert(), dir.join("ca.crt")).unwrap();
    dir.to_path_buf()
}

/// skopeo copies `image` from the registry into a fresh OCI layout,
/// trusting what `certs` holds; its output on failure.
fn skopeo_pull(image: &str, certs: &Path, into: &Path) -> Result<(), String> {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-cert-dir"])
        .arg(certs)
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:v1", into.display()))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn podman_pull(image: &str, certs: &Path, root: &Path) {
    let out = Command::new("podman")
        .arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "pull",
            "-q",
            "--cert-dir",
        ])
        .arg(certs)
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "podman: {}", String::from_utf8_lossy(&out.stderr));
}

/// The control image as an OCI layout tagged `v1`: its directory, its
/// manifest digest and its `oci:` name for skopeo.
fn control_layout() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (m, _) = layout.image(&crate::control_image());
    layout.tag("v1", &m, None);
    let src = format!("oci:{}:v1", dir.path().display());
    (dir, m.digest.to_string(), src)
}

/// `gantry serve` trusting `ts`'s tokens, with `extra` flags.
fn token_registry(ts: &gantry_tests::token::TokenServer, extra: &[&str]) -> (Gantry, gantry_tests::gantry::Server) {
    use gantry_tests::token::{ISSUER, SERVICE};
    let g = Gantry::new();
    let (certs, realm) = (ts.cert(), ts.realm());
    let mut args = vec![
        "--token-realm",
        &realm,
        "--token-service",
        SERVICE,
        "--token-issuer",
        ISSUER,
        "--token-certs",
        certs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let srv = g.serve(&args);
    (g, srv)
}

/// A keep-alive HTTPS connection held by a Python client: one request
/// when started, the next when told to, on the same connection.
const HOLD: &str = r#"
import http.client, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=sys.argv[2]))
for step in ("first", "second"):
    if step == "second":
        sys.stdin.readline()
    c.request("GET", "/v2/")
    r = c.getresponse()
    r.read()
    print(step, r.status, c.sock.getpeercert()["serialNumber"], flush=True)
"#;

/// HTTPS with a test CA: skopeo pushes, skopeo and podman pull, curl
/// speaks HTTP/2. The certificate is replaced by one of another CA and
/// SIGHUP sent: a connection open across it keeps working with the old
/// one, new connections get the new one (clients trusting only the old CA
/// are refused, the new CA's pull), and a pair that does not load leaves
/// the one in use.
#[test]
fn skopeo_and_podman_pull_over_tls_and_again_after_the_certificate_is_replaced() {
    if !peers() || !require("podman") || !require("curl") {
        return;
    }
    let g = Gantry::new();
    let work = g.scratch().join("tls");
    std::fs::create_dir_all(&work).unwrap();
    let (cert, key) = (work.join("server.crt"), work.join("server.key"));
    let old_ca = TestCa::new(&work);
    let (c, k) = old_ca.server_cert(&["localhost"], &["127.0.0.1"]);
    std::fs::copy(&c, &cert).unwrap();
    std::fs::copy(&k, &key).unwrap();
    let srv = g.serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--header-timeout",
        "60",
    ]);
    assert!(srv.log().contains("listening on https://"), "{}", srv.log());
    let old = trusting(&work.join("trust-old"), &old_ca);
    let image = format!("{}/test/app:v1", srv.addr);

    let (_layout, _, src) = control_layout();
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-cert-dir",
        old.to_str().unwrap(),
        &src,
        &format!("docker://{image}"),
    ]);
    skopeo_pull(&image, &old, &work.join("pulled-old")).unwrap();
    podman_pull(&image, &old, &work.join("podman-old"));
    // Plain HTTP to the TLS port is not answered as a registry.
    assert!(!crate::serve::get(&srv.addr, "/v2/").starts_with("HTTP/1.1 200"));

    let curl = |ca: &Path, http: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                http,
                "--cacert",
            ])
            .arg(ca)
            .arg(format!("https://{}/v2/", srv.addr))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(curl(&old_ca.cert(), "--http2"), "2 200");
    assert_eq!(curl(&old_ca.cert(), "--http1.1"), "1.1 200");

    // A connection opened before the certificate changes.
    let mut held = Command::new("python3")
        .args(["-c", HOLD, &srv.addr, old_ca.cert().to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the held connection's first answer").unwrap();
    assert!(first.starts_with("first 200 "), "{first}");

    let new_ca = TestCa::new(&work);
    let (c, k) = new_ca.server_cert(&["localhost"], &["127.0.0.1"]);
    std::fs::copy(&c, &cert).unwrap();
    std::fs::copy(&k, &key).unwrap();
    srv.signal(libc::SIGHUP);
    srv.wait_for("gantry serve: reloaded the TLS certificate");

    // The old connection goes on, with the certificate it started with.
    writeln!(held.stdin.as_mut().unwrap()).unwrap();
    let second = lines.next().expect("the held connection's second answer").unwrap();
    assert_eq!(
        second.replacen("second", "first", 1),
        first,
        "same connection, same certificate"
    );
    assert!(held.wait().unwrap().success());

    // New connections get the new certificate.
    let refused = skopeo_pull(&image, &old, &work.join("pulled-refused")).unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    let new = trusting(&work.join("trust-new"), &new_ca);
    skopeo_pull(&image, &new, &work.join("pulled-new")).unwrap();
    podman_pull(&image, &new, &work.join("podman-new"));
    assert_eq!(curl(&new_ca.cert(), "--http2"), "2 200");

    // A key that does not load: the pair in use stays, and says so.
    std::fs::write(&key, b"not a key\n").unwrap();
    srv.signal(libc::SIGHUP);
    srv.wait_for("gantry serve: keeping the TLS certificate in use: reading the key");
    skopeo_pull(&image, &new, &work.join("pulled-kept")).unwrap();
}

/// A certificate and key that do not load stop `serve` before it listens,
/// with one line naming the file.
#[test]
fn serve_refuses_a_certificate_it_cannot_use() {
    let g = Gantry::new();
    let work = g.scratch().join("bad-tls");
    std::fs::create_dir_all(&work).unwrap();
    let ca = TestCa::new(&work);
    let (cert, key) = ca.server_cert(&["localhost"], &[]);
    let (_, other_key) = ca.server_cert(&["elsewhere"], &[]);
    let empty = work.join("empty.pem");
    std::fs::write(&empty, b"").unwrap();
    for (c, k, expect) in [
        (&empty, &key, "holds no PEM certificate"),
        (&cert, &empty, "reading the key"),
        (&cert, &other_key, "do not make a server identity"),
    ] {
        let err = g.fails(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            c.to_str().unwrap(),
            "--tls-key",
            k.to_str().unwrap(),
        ]);
        assert!(err.contains(expect), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    // The usage error clap gives a flag without its partner.
    let half = g.run(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap()]);
    assert_eq!(half.out.status.code(), Some(2));
    assert!(half.stderr().contains("--tls-key"), "{}", half.stderr());
}

/// One request with `token` as its bearer credentials: the whole answer.
fn with_token(addr: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: application/vnd.oci.image.manifest.v1+json\r\n\
         Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    crate::serve::raw(addr, &req)
}

fn www_authenticate(resp: &str) -> String {
    crate::serve::header(resp, "WWW-Authenticate")
        .unwrap_or_default()
        .to_string()
}

/// Distribution's token auth with a token server of the test's own
/// (users may pull and push `<user>/…`): skopeo pushes and reads only what
/// its user's tokens grant; a token for one repository reads no other and
/// pushes nowhere without `push`; no token, a forged one and a catalog
/// request without its scope get 401 with the challenge; and the docker
/// CLI logs in and pushes and pulls through `gantry daemon`.
#[test]
fn token_scopes_decide_who_reads_and_pushes_what() {
    if !peers() {
        return;
    }
    use gantry_tests::token::{TokenServer, ISSUER, SERVICE};
    let ts = TokenServer::start(&[("alice", "a-pw"), ("bob", "b-pw")]);
    let (_g, srv) = token_registry(&ts, &[]);
    let realm = ts.realm();
    let (_layout, manifest_digest, src) = control_layout();
    let push = |creds: &str, repo: &str| {
        Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-creds",
                creds,
                &src,
            ])
            .arg(format!("docker://{}/{repo}:v1", srv.addr))
            .output()
            .unwrap()
    };
    let inspect = |creds: &str, repo: &str| {
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--creds", creds])
            .arg(format!("docker://{}/{repo}:v1", srv.addr))
            .output()
            .unwrap()
    };
    let pushed = push("alice:a-pw", "alice/app");
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    assert!(
        !push("alice:a-pw", "bob/app").status.success(),
        "alice pushed into bob/"
    );
    assert!(
        !push("alice:wrong", "alice/other").status.success(),
        "a wrong password pushed"
    );
    let read = inspect("alice:a-pw", "alice/app");
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let v: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(v["Digest"], manifest_digest.as_str());
    assert!(!inspect("bob:b-pw", "alice/app").status.success(), "bob read alice/");

    // No token: the challenge says where to get one, and for what.
    let path = "/v2/alice/app/manifests/v1";
    let r = with_token(&srv.addr, "GET", path, None, b"");
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    assert_eq!(
        www_authenticate(&r),
        format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\",scope=\"repository:alice/app:pull\"")
    );
    // A token for alice/app (pull only) reads it, and nothing else.
    let pull_a = ts.token(Some("alice"), &[("alice/app", &["pull"])]);
    let r = with_token(&srv.addr, "GET", path, Some(&pull_a), b"");
    assert_eq!(crate::serve::status(&r), 200, "{r}");
    let manifest = crate::serve::body(&r).to_string();
    let r = with_token(&srv.addr, "GET", "/v2/bob/app/manifests/v1", Some(&pull_a), b"");
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    assert!(www_authenticate(&r).contains("error=\"insufficient_scope\""), "{r}");
    assert!(
        www_authenticate(&r).contains("scope=\"repository:bob/app:pull\""),
        "{r}"
    );
    // …and pushes nowhere without `push`.
    let r = with_token(
        &srv.addr,
        "PUT",
        "/v2/alice/app/manifests/v2",
        Some(&pull_a),
        manifest.as_bytes(),
    );
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    assert!(
        www_authenticate(&r).contains("scope=\"repository:alice/app:pull,push\""),
        "{r}"
    );
    let push_a = ts.token(Some("alice"), &[("alice/app", &["pull", "push"])]);
    let r = with_token(
        &srv.addr,
        "PUT",
        "/v2/alice/app/manifests/v2",
        Some(&push_a),
        manifest.as_bytes(),
    );
    assert_eq!(crate::serve::status(&r), 201, "{r}");
    // Deleting needs `delete`, the catalog `registry:catalog:*`.
    let r = with_token(&srv.addr, "DELETE", "/v2/alice/app/manifests/v2", Some(&push_a), b"");
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    let r = with_token(&srv.addr, "GET", "/v2/_catalog", Some(&push_a), b"");
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    assert!(www_authenticate(&r).contains("scope=\"registry:catalog:*\""), "{r}");
    // A token another issuer's key signed, naming our issuer, is refused.
    let forger = TokenServer::start(&[]);
    let forged = forger.token(Some("alice"), &[("alice/app", &["pull"])]);
    let r = with_token(&srv.addr, "GET", path, Some(&forged), b"");
    assert_eq!(crate::serve::status(&r), 401, "{r}");
    assert!(r.contains("signature"), "{r}");
    // Unsigned, or "signed" with the public certificate as an HMAC secret.
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = serde_json::json!({"iss": ISSUER, "aud": SERVICE, "exp": u64::MAX / 2,
        "access": [{"type": "repository", "name": "alice/app", "actions": ["pull"]}]});
    let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none"})), b64(&claims));
    let hmac = format!("{}.{}.AAAA", b64(&serde_json::json!({"alg": "HS256"})), b64(&claims));
    for junk in ["", "a.b", "e30.e30.e30", "not a token at all", &none, &hmac] {
        let r = with_token(&srv.addr, "GET", path, Some(junk), b"");
        assert_eq!(crate::serve::status(&r), 401, "{junk:?}: {r}");
    }

    // The docker CLI, through gantry daemon: login, push, pull.
    if require("docker") {
        let client = Gantry::new();
        let d = client.daemon();
        let out = crate::daemon::login(&client, &d.addr, &srv.addr, "alice", "wrong");
        assert!(!out.status.success(), "{out:?}");
        let out = crate::daemon::login(&client, &d.addr, &srv.addr, "alice", "a-pw");
        assert!(out.status.success(), "{out:?}");
        let image = format!("{}/alice/app:v1", srv.addr);
        crate::daemon::ok(&client, &d.addr, &["pull", &image]);
        let copy = format!("{}/alice/copy:v1", srv.addr);
        crate::daemon::ok(&client, &d.addr, &["tag", &image, &copy]);
        crate::daemon::ok(&client, &d.addr, &["push", &copy]);
        let read = inspect("alice:a-pw", "alice/copy");
        assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
        let theirs = format!("{}/bob/copy:v1", srv.addr);
        crate::daemon::ok(&client, &d.addr, &["tag", &image, &theirs]);
        let out = crate::daemon::docker_command(&client, &d.addr)
            .args(["push", &theirs])
            .output()
            .unwrap();
        assert!(!out.status.success(), "alice pushed into bob/ through the daemon");
    }
}

/// The metrics address `srv` printed.
fn metrics_addr(srv: &gantry_tests::gantry::Server) -> String {
    srv.log()
        .lines()
        .find_map(|l| l.strip_prefix("gantry serve: metrics and health on http://"))
        .expect("the metrics line")
        .trim()
        .to_string()
}

/// The value of the sample `name{labels}` (labels as printed, in order),
/// 0 when there is none yet.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn scrape(addr: &str) -> String {
    let r = crate::serve::get(addr, "/metrics");
    assert_eq!(crate::serve::status(&r), 200, "{r}");
    assert!(r.contains("text/plain; version=0.0.4"), "{r}");
    crate::serve::body(&r).to_string()
}

/// `/metrics` moves as requests are made: requests by route, method and
/// status, latency histograms, bytes in and out, upload sessions open;
/// through a mirror, its cache hits, misses and upstream fetches.
/// `/healthz` says ok while the storage answers and 503 once it does not.
/// Neither is on the registry's own address.
#[test]
fn metrics_move_with_requests_and_healthz_checks_the_storage() {
    if !peers() {
        return;
    }
    let g = Gantry::new();
    let srv = g.serve(&["--metrics-listen", "127.0.0.1:0"]);
    let m = metrics_addr(&srv);
    let before = scrape(&m);
    let pushes = r#"gantry_serve_requests_total{route="upload",method="PUT",status="201"}"#;
    assert_eq!(sample(&before, pushes), 0.0);

    let (layout_dir, _, src) = control_layout();
    let image = format!("docker://{}/test/app:v1", srv.addr);
    skopeo(&["copy", "--quiet", "--dest-tls-verify=false", &src, &image]);
    let pushed = scrape(&m);
    assert!(sample(&pushed, pushes) >= 2.0, "{pushed}");
    let blob_bytes: u64 = std::fs::read_dir(layout_dir.path().join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let bytes_in = sample(&pushed, "gantry_serve_request_bytes_total");
    assert!(
        bytes_in >= (blob_bytes / 2) as f64,
        "{bytes_in} of {blob_bytes}: {pushed}"
    );
    let out_before = sample(&pushed, "gantry_serve_response_bytes_total");

    let into = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &image,
        &format!("oci:{}:v1", into.path().display()),
    ]);
    let pulled = scrape(&m);
    let gets = r#"gantry_serve_requests_total{route="blob",method="GET",status="200"}"#;
    assert!(sample(&pulled, gets) >= 2.0, "{pulled}");
    assert!(
        sample(&pulled, "gantry_serve_response_bytes_total") > out_before + 1000.0,
        "{pulled}"
    );
    assert!(
        sample(
            &pulled,
            r#"gantry_serve_request_duration_seconds_count{route="manifest"}"#
        ) >= 1.0,
        "{pulled}"
    );
    let missing = crate::serve::get(&srv.addr, "/v2/test/app/manifests/nope");
    assert_eq!(crate::serve::status(&missing), 404);
    let unknown = r#"gantry_serve_requests_total{route="manifest",method="GET",status="404"}"#;
    assert_eq!(sample(&scrape(&m), unknown), 1.0);

    // An upload session left open shows until it is cancelled.
    let started = crate::serve::raw(
        &srv.addr,
        format!(
            "POST /v2/test/app/blobs/uploads/ HTTP/1.1\r\nHost: {0}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    );
    assert_eq!(crate::serve::status(&started), 202, "{started}");
    assert_eq!(sample(&scrape(&m), "gantry_serve_uploads_open"), 1.0);

    // Not on the registry's address; health while the storage answers.
    assert_eq!(crate::serve::status(&crate::serve::get(&srv.addr, "/metrics")), 404);
    let ok = crate::serve::get(&m, "/healthz");
    assert_eq!(crate::serve::status(&ok), 200, "{ok}");
    assert_eq!(crate::serve::body(&ok), "ok\n");
    std::fs::remove_dir_all(g.root_path().join("registry")).unwrap();
    let down = crate::serve::get(&m, "/healthz");
    assert_eq!(crate::serve::status(&down), 503, "{down}");
    assert!(crate::serve::body(&down).starts_with("storage: "), "{down}");

    // A mirror counts its cache.
    let upstream = gantry_tests::registry::Registry::start();
    crate::publish(&upstream, "test/app", "v1", &crate::control_image());
    let (_store, mirror) = crate::mirror::mirror_of(&upstream.addr(), &["--metrics-listen", "127.0.0.1:0"]);
    let mm = metrics_addr(&mirror);
    let pull = |dir: &Path| {
        skopeo(&[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{}/test/app:v1", mirror.addr),
            &format!("oci:{}:v1", dir.display()),
        ])
    };
    let first = tempfile::tempdir().unwrap();
    pull(first.path());
    let cold = scrape(&mm);
    let (hits, misses, fetches) = (
        sample(&cold, "gantry_serve_mirror_cache_hits_total"),
        sample(&cold, "gantry_serve_mirror_cache_misses_total"),
        sample(&cold, "gantry_serve_mirror_upstream_fetches_total"),
    );
    assert!(misses >= 3.0 && fetches >= 3.0, "{cold}");
    let second = tempfile::tempdir().unwrap();
    pull(second.path());
    let warm = scrape(&mm);
    assert!(
        sample(&warm, "gantry_serve_mirror_cache_hits_total") >= hits + 2.0,
        "{warm}"
    );
    assert_eq!(
        sample(&warm, "gantry_serve_mirror_cache_misses_total"),
        misses,
        "{warm}"
    );
    assert_eq!(
        sample(&warm, "gantry_serve_mirror_upstream_fetches_total"),
        fetches,
        "{warm}"
    );
}

/// `DELETE` of a manifest by the digest of a big blob the repository does
/// not hold reads nothing of it (before, the whole blob was read into
/// memory first): a few at once leave the server's peak memory where it was.
#[test]
fn deleting_a_manifest_another_repository_holds_reads_nothing() {
    let g = Gantry::new();
    let srv = g.serve(&[]);
    // A 96 MiB blob in one repository.
    let blob: Vec<u8> = (0..96u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = gantry_tests::image::sha256(&blob);
    let mut req = format!(
        "POST /v2/big/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {0}\r\nContent-Length: {1}\r\nConnection: close\r\n\r\n",
        srv.addr,
        blob.len()
    )
    .into_bytes();
    req.extend_from_slice(&blob);
    drop(blob);
    let r = crate::serve::raw(&srv.addr, &req);
    drop(req);
    assert_eq!(crate::serve::status(&r), 201, "{r}");
    let peak = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    let before = peak(srv.child.id());
    let deletes: Vec<_> = (0..4)
        .map(|i| {
            let (addr, digest) = (srv.addr.clone(), digest.clone());
            std::thread::spawn(move || {
                crate::serve::raw(
                    &addr,
                    format!(
                        "DELETE /v2/other{i}/manifests/{digest} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
            })
        })
        .collect();
    for d in deletes {
        let r = d.join().unwrap();
        assert_eq!(crate::serve::status(&r), 404, "{r}");
    }
    let after = peak(srv.child.id());
    assert!(after < before + 32, "peak memory went from {before} MiB to {after} MiB");
    // The blob is still served where it is.
    let head = crate::serve::raw(
        &srv.addr,
        format!(
            "HEAD /v2/big/blobs/{digest} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    );
    assert_eq!(crate::serve::status(&head), 200, "{head}");
}

/// Clients trickling manifest bodies hold only what they sent: with more
/// of them than there used to be slots for manifests, another client's
/// manifest push still goes through at once.
#[test]
fn trickled_manifest_bodies_do_not_hold_up_other_pushes() {
    let g = Gantry::new();
    let srv = g.serve(&["--header-timeout", "60"]);
    let mut stalled = Vec::new();
    for i in 0..24 {
        let mut s = std::net::TcpStream::connect(&srv.addr).unwrap();
        write!(
            s,
            "PUT /v2/slow/manifests/t{i} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n{{",
            srv.addr
        )
        .unwrap();
        stalled.push(s);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // An index of no manifests needs nothing else in the repository.
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let mut s = std::net::TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(
        s,
        "PUT /v2/fast/manifests/v1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        srv.addr,
        index.len()
    )
    .unwrap();
    s.write_all(index).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the push waited on the stalled ones: {answer:?}"
    );
    drop(stalled);
}

/// A client speaking HTTP/2 that opens no stream (answering only the
/// server's pings) is closed after the header timeout, as an idle
/// HTTP/1.1 client is, instead of holding a connection slot for ever.
#[test]
fn an_idle_http2_connection_is_closed() {
    let g = Gantry::new();
    let work = g.scratch().join("h2");
    std::fs::create_dir_all(&work).unwrap();
    let ca = TestCa::new(&work);
    let (cert, key) = ca.server_cert(&["localhost"], &["127.0.0.1"]);
    let srv = g.serve(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--header-timeout",
        "2",
    ]);
    let script = r#"
import socket, ssl, struct, sys, time
host, port = sys.argv[1].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + struct.pack(">I", 0)[1:] + bytes([4, 0]) + struct.pack(">I", 0))
s.settimeout(30)
start, buf = time.time(), b""
# Never longer than 20 s: a server that keeps it open fails the test, not hangs it.
while time.time() - start < 20:
    try:
        data = s.recv(65536)
    except (ConnectionResetError, ssl.SSLError):
        data = b""
    if not data:
        break
    buf += data
    while len(buf) >= 9:
        n = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + n:
            break
        kind, flags, payload = buf[3], buf[4], buf[9:9 + n]
        buf = buf[9 + n:]
        if kind == 6 and not flags & 1:
            s.sendall(struct.pack(">I", 8)[1:] + bytes([6, 1]) + struct.pack(">I", 0) + payload)
        if kind == 4 and not flags & 1:
            s.sendall(struct.pack(">I", 0)[1:] + bytes([4, 1]) + struct.pack(">I", 0))
print(round(time.time() - start, 1))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &srv.addr, ca.cert().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let held: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(held < 10.0, "an idle HTTP/2 connection stayed open {held} s");
}

/// Under token auth one user cannot take every upload session by opening
/// them in repositories of their own: a token's subject gets at most a
/// quarter of `--max-uploads`, and others still push.
#[test]
fn one_token_subject_cannot_take_every_upload_session() {
    if !require("openssl") {
        return;
    }
    let ts = gantry_tests::token::TokenServer::start(&[("alice", "a-pw"), ("bob", "b-pw")]);
    let (_g, srv) = token_registry(&ts, &["--max-uploads", "8", "--max-uploads-per-repo", "8"]);
    let repos: [(&str, &[&str]); 3] = [("alice/a", &["push"]), ("alice/b", &["push"]), ("alice/c", &["push"])];
    let alice = ts.token(Some("alice"), &repos);
    let bob = ts.token(Some("bob"), &[("bob/x", &["push"])]);
    let start = |token: &str, repo: &str| {
        with_token(
            &srv.addr,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            Some(token),
            b"",
        )
    };
    assert_eq!(crate::serve::status(&start(&alice, "alice/a")), 202);
    assert_eq!(crate::serve::status(&start(&alice, "alice/b")), 202);
    let third = start(&alice, "alice/c");
    assert_eq!(crate::serve::status(&third), 429, "{third}");
    assert!(third.contains("open for you"), "{third}");
    assert_eq!(crate::serve::status(&start(&bob, "bob/x")), 202);
}
