//! Docker's credential helpers: `credsStore` and `credHelpers` in a Docker
//! `config.json` give pull, push, `fsck --repair` and the daemon their
//! registry credentials, through a real helper (`docker-credential-pass`,
//! with a throwaway GPG key and `pass` store in the test's directory); a
//! helper that is missing, fails, answers garbage or hangs ends the
//! operation in one line and leaves the store as it was.

use crate::{assert_refused, control_store};
use gantry_tests::gantry::Gantry;
use gantry_tests::registry::Registry;
use gantry_tests::require;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A `pass` store encrypted to a GPG key without a passphrase, both in
/// `dir`: the environment `docker-credential-pass` needs to use them.
struct PassStore {
    env: Vec<(String, String)>,
}

impl PassStore {
    fn new(dir: &Path) -> PassStore {
        let gnupg = dir.join("gnupg");
        std::fs::create_dir_all(&gnupg).unwrap();
        std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let env = vec![
            ("GNUPGHOME".to_string(), gnupg.display().to_string()),
            ("PASSWORD_STORE_DIR".to_string(), dir.join("pass").display().to_string()),
        ];
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program).args(args).envs(env.clone()).output().unwrap();
            assert!(out.status.success(), "{program} {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(
            "gpg",
            &[
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--quick-gen-key",
                "gantry test <test@gantry.invalid>",
                "default",
                "default",
                "never",
            ],
        );
        let keys = run("gpg", &["--list-keys", "--with-colons"]);
        let fpr = keys
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|l| l.trim_matches(':').split(':').next_back())
            .unwrap()
            .to_string();
        run("pass", &["init", &fpr]);
        PassStore { env }
    }

    /// Files `user`/`secret` for `server`, as `docker login` does.
    fn store(&self, server: &str, user: &str, secret: &str) {
        let mut c = Command::new("docker-credential-pass")
            .arg("store")
            .envs(self.env.clone())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let body = serde_json::json!({"ServerURL": server, "Username": user, "Secret": secret});
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), body.to_string().as_bytes()).unwrap();
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    }
}

impl Drop for PassStore {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .envs(self.env.clone())
            .status();
    }
}

/// `g` with `config.json` as its Docker config, `bin` first in its `PATH`,
/// and the pass store's environment.
fn with_docker_config(mut g: Gantry, config: serde_json::Value, pass: &PassStore, bin: &Path) -> Gantry {
    let dir = g.scratch().join(format!("docker-config-{}", g.env.len()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    g.env.retain(|(k, _)| k != "DOCKER_CONFIG" && k != "PATH");
    g.env.push(("DOCKER_CONFIG".into(), dir.display().to_string()));
    g.env.push(("PATH".into(), path_with(bin)));
    g.env.extend(pass.env.clone());
    g
}

fn path_with(bin: &Path) -> String {
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default())
}

/// Helpers that misbehave, as `docker-credential-NAME` scripts in a
/// directory of their own.
fn bad_helpers(dir: &Path) -> PathBuf {
    let bin = dir.join("helpers");
    std::fs::create_dir_all(&bin).unwrap();
    let pidfile = dir.join("hung.pid");
    for (name, script) in [
        ("garbage", "#!/bin/sh\nprintf 'not json \\033[31mred'\n".to_string()),
        (
            "fails",
            "#!/bin/sh\necho 'boom: the keychain is locked'\nexit 3\n".to_string(),
        ),
        (
            "hangs",
            format!("#!/bin/sh\necho $$ > {}\nsleep 600\n", pidfile.display()),
        ),
        (
            "notfound",
            "#!/bin/sh\necho 'credentials not found in native keychain'\nexit 1\n".to_string(),
        ),
        // The secret, then a warning: the answer is refused and never shown.
        (
            "trailing",
            "#!/bin/sh\necho '{\"Username\":\"u\",\"Secret\":\"TOPSECRET\"}'\necho 'warning: keychain slow'\n"
                .to_string(),
        ),
        // 64 KiB of chatter on standard error, then pass's own answer.
        (
            "chatty",
            "#!/bin/sh\nhead -c 65536 /dev/zero | tr '\\0' x >&2\nexec docker-credential-pass get\n".to_string(),
        ),
    ] {
        let p = bin.join(format!("docker-credential-{name}"));
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    bin
}

/// A registry that answers only alice (password `s3cret`), pulls too.
struct Private {
    _registry: Registry,
    addr: String,
}

fn private_registry(g: &Gantry) -> Private {
    let htpasswd = g.scratch().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let registry = Registry::start_htpasswd(&htpasswd);
    Private {
        addr: registry.addr(),
        _registry: registry,
    }
}

#[test]
fn credential_helpers_give_pull_push_and_repair_their_credentials() {
    if !(require("docker-credential-pass") && require("pass") && require("gpg")) {
        return;
    }
    let Some((reg, g)) = control_store() else { return };
    let srv = private_registry(&g);
    let private = format!("{}/team/private:v1", srv.addr);
    g.ok(&["tag", &format!("{}/test/control:v1", reg.addr()), &private]);

    let pass = PassStore::new(&g.scratch());
    pass.store(&srv.addr, "alice", "s3cret");
    let bin = bad_helpers(&g.scratch());

    // Without a helper the registry refuses; with `credsStore: pass` the
    // push goes through with pass's secret.
    let err = g.fails(&["push", &private]);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    let g = with_docker_config(g, serde_json::json!({"credsStore": "pass"}), &pass, &bin);
    let out = g.ok(&["push", &private]);
    assert!(out.lines().last().unwrap().starts_with("v1: digest: sha256:"), "{out}");
    let id = g.ok(&["inspect", &private]);

    // A fresh store pulls it through a per-registry `credHelpers` entry,
    // which wins over a `credsStore` that would fail.
    let h = with_docker_config(
        Gantry::new(),
        serde_json::json!({"credsStore": "fails", "credHelpers": {srv.addr.clone(): "pass"}}),
        &pass,
        &bin,
    );
    h.ok(&["pull", &private]);
    let image_id = |inspect: &str| {
        let v: serde_json::Value = serde_json::from_str(inspect).unwrap();
        v[0]["Id"].as_str().unwrap().to_string()
    };
    assert_eq!(image_id(&h.ok(&["inspect", &private])), image_id(&id));

    // fsck --repair fetches a damaged layer again with the helper's login.
    assert!(crate::store::flip_a_byte(&h, "etc/control") >= 1);
    let out = h.ok(&["fsck", "--repair"]);
    assert!(out.contains("repaired: layer"), "{out}");
    h.ok(&["fsck", "--verify-content"]);

    // A helper that has nothing for the registry: no credentials, as for
    // Docker, even beside an `auths` secret (a stale one is never used).
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let none = with_docker_config(
        Gantry::new(),
        serde_json::json!({"credsStore": "notfound", "auths": {srv.addr.clone(): {"auth": auth}}}),
        &pass,
        &bin,
    );
    let err = none.fails(&["pull", &private]);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    // Without a helper, the `auths` secret.
    let plain = with_docker_config(
        Gantry::new(),
        serde_json::json!({"auths": {srv.addr.clone(): {"auth": auth}}}),
        &pass,
        &bin,
    );
    plain.ok(&["pull", &private]);
    // A helper that talks a lot on standard error still answers.
    let chatty = with_docker_config(Gantry::new(), serde_json::json!({"credsStore": "chatty"}), &pass, &bin);
    chatty.ok(&["pull", &private]);

    // Helpers that fail: one line naming the program, the store unchanged.
    for (config, expect) in [
        (
            serde_json::json!({"credsStore": "missing"}),
            "docker-credential-missing: not found in PATH",
        ),
        (
            serde_json::json!({"credHelpers": {srv.addr.clone(): "fails"}}),
            "docker-credential-fails get failed (exit status: 3): \"boom: the keychain is locked\"",
        ),
        (
            serde_json::json!({"credsStore": "garbage"}),
            "docker-credential-garbage get answered 17 bytes that are not credentials JSON (a syntax error at line 1, column 2)",
        ),
        (
            serde_json::json!({"credsStore": "trailing"}),
            "docker-credential-trailing get answered 61 bytes that are not credentials JSON (a syntax error at line 2, column 1)",
        ),
    ] {
        let bad = with_docker_config(Gantry::new(), config, &pass, &bin);
        bad.ok(&["images"]);
        let line = assert_refused(&bad, &["pull", &private], expect);
        assert!(!line.contains("TOPSECRET"), "{line}");
        assert!(
            line.contains(&format!("error getting credentials for {}: ", srv.addr)),
            "{line}"
        );
    }
    let bad = with_docker_config(Gantry::new(), serde_json::json!({"credsStore": "../pass"}), &pass, &bin);
    bad.ok(&["images"]);
    assert_refused(
        &bad,
        &["pull", &private],
        "credsStore: \"../pass\" is not a credential helper's name",
    );
    // A push asks the same way.
    let g = with_docker_config(g, serde_json::json!({"credsStore": "garbage"}), &pass, &bin);
    let line = assert_refused(&g, &["push", &private], "docker-credential-garbage get answered");
    assert!(!line.contains("[31m"), "{line}");

    // A helper that hangs is killed with what it started, after the
    // configured time.
    let hung = with_docker_config(Gantry::new(), serde_json::json!({"credsStore": "hangs"}), &pass, &bin).with_config(
        &format!(
            "credential_helper_timeout_seconds = 2\n[driver]\ntype = \"{}\"\n",
            Gantry::test_driver()
        ),
    );
    hung.ok(&["images"]);
    assert_refused(
        &hung,
        &["pull", &private],
        "docker-credential-hangs: did not answer within 2 s",
    );
    let pid = std::fs::read_to_string(g.scratch().join("hung.pid")).unwrap();
    // (A killed process may take a moment to go; a zombie is gone.)
    let alive = || {
        let out = Command::new("pgrep")
            .args(["-g", pid.trim(), "--runstates", "D,R,S,T"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let started = std::time::Instant::now();
    while !alive().is_empty() && started.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(alive(), "", "the helper's group lives on");
}

#[test]
fn the_daemon_serves_docker_clients_whose_login_lives_in_a_credential_helper() {
    if !(require("docker-credential-pass") && require("pass") && require("gpg") && require("docker")) {
        return;
    }
    let Some((reg, g)) = control_store() else { return };
    let srv = private_registry(&g);
    let private = format!("{}/team/private:v1", srv.addr);
    let pass = PassStore::new(&g.scratch());
    let bin = bad_helpers(&g.scratch());
    let d = g.daemon();

    // The docker CLI logs in through the daemon (`/auth`) and files the
    // login in its own `pass` store, then pushes and pulls with it.
    let cli_config = g.scratch().join("docker-cli");
    std::fs::create_dir_all(&cli_config).unwrap();
    std::fs::write(cli_config.join("config.json"), r#"{"credsStore":"pass"}"#).unwrap();
    let docker = |args: &[&str], stdin: &str| {
        let mut c = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", &d.addr)
            .env("DOCKER_CONFIG", &cli_config)
            .envs(pass.env.clone())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), stdin.as_bytes()).unwrap();
        drop(c.stdin.take());
        c.wait_with_output().unwrap()
    };
    let out = docker(&["login", &srv.addr, "-u", "alice", "--password-stdin"], "s3cret\n");
    assert!(out.status.success(), "{out:?}");
    let filed = std::fs::read_to_string(cli_config.join("config.json")).unwrap();
    assert!(
        !filed.contains("s3cret") && !filed.contains("YWxpY2U6czNjcmV0"),
        "{filed}"
    );
    let out = docker(&["tag", &format!("{}/test/control:v1", reg.addr()), &private], "");
    assert!(out.status.success(), "{out:?}");
    let out = docker(&["push", &private], "");
    assert!(out.status.success(), "{out:?}");
    let out = docker(&["rmi", &private], "");
    assert!(out.status.success(), "{out:?}");
    let out = docker(&["pull", &private], "");
    assert!(out.status.success(), "{out:?}");
    drop(d);

    // A daemon whose config names a Docker config with `credHelpers` pulls
    // for a client that sends nothing.
    pass.store(&srv.addr, "alice", "s3cret");
    let daemon_auth = g.scratch().join("daemon-auth");
    std::fs::create_dir_all(&daemon_auth).unwrap();
    std::fs::write(
        daemon_auth.join("config.json"),
        serde_json::json!({"credHelpers": {srv.addr.clone(): "pass"}}).to_string(),
    )
    .unwrap();
    let mut h = Gantry::new().with_config(&format!(
        "auth_file = \"{}\"\n[driver]\ntype = \"{}\"\n",
        daemon_auth.join("config.json").display(),
        Gantry::test_driver()
    ));
    h.env.extend(pass.env.clone());
    h.env.push(("PATH".into(), path_with(&bin)));
    let d = h.daemon();
    let out = Command::new("docker")
        .args(["pull", &private])
        .env("DOCKER_HOST", &d.addr)
        .env("DOCKER_CONFIG", h.scratch().join("empty-docker-config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    h.ok(&["inspect", &private]);
}
