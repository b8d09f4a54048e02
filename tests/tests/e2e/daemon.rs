//! `gantry daemon`: the real `docker` CLI (28.x) talks to gantry over its
//! socket: version negotiation, pull with Docker's progress stream, images,
//! inspect, history, tag, rmi, save | load, push, image prune, and a clean
//! 501 for what it does not serve.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::registry::Registry;
use gantry_tests::require;
use std::process::{Command, Output};

/// The docker CLI speaking to `host`, with a config of the test's own.
pub(crate) fn docker_command(g: &Gantry, host: &str) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", host)
        // Never the developer's config or credentials.
        .env("DOCKER_CONFIG", docker_config(&g.scratch().join("docker-config")));
    c
}

/// A docker CLI config directory that keeps logins in its `config.json`.
/// Without one, the CLI picks a credential helper of the machine's
/// (`pass` when it is installed) and a login fails where it is not set up;
/// one `credHelpers` entry, for a host nothing uses, turns that guess off.
fn docker_config(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("config.json");
    if !file.exists() {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&file, r#"{"credHelpers": {"helper.invalid": "none"}}"#).unwrap();
    }
    dir.to_path_buf()
}

fn docker(g: &Gantry, host: &str, args: &[&str]) -> Output {
    docker_command(g, host).args(args).output().unwrap()
}

pub(crate) fn ok(g: &Gantry, host: &str, args: &[&str]) -> String {
    let out = docker(g, host, args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_docker_cli_pulls_lists_inspects_tags_and_removes_through_the_daemon() {
    if !(peers() && require("docker")) {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/app", "v1", &control_image());
    let g = Gantry::new();
    let d = g.daemon();
    let name = format!("{}/test/app:v1", reg.addr());

    let pulled = ok(&g, &d.addr, &["pull", &name]);
    assert!(pulled.contains("v1: Pulling from test/app"), "{pulled}");
    assert!(
        pulled.contains(&format!("Status: Downloaded newer image for {name}")),
        "{pulled}"
    );

    // `docker info`: the store's image count and driver.
    let info = ok(
        &g,
        &d.addr,
        &["info", "--format", "{{.Images}} {{.Driver}} {{.DockerRootDir}}"],
    );
    assert_eq!(
        info.trim(),
        format!("1 {} {}", g.driver(), g.root_path().display()),
        "{info}"
    );

    let images = ok(&g, &d.addr, &["images"]);
    let row = images
        .lines()
        .find(|l| l.starts_with(&format!("{}/test/app ", reg.addr())))
        .unwrap_or_else(|| panic!("{images}"));
    assert!(row.split_whitespace().nth(1) == Some("v1"), "{images}");

    // The same image the CLI's own inspect shows.
    let theirs: serde_json::Value = serde_json::from_str(&ok(&g, &d.addr, &["image", "inspect", &name])).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    assert_eq!(theirs[0]["Id"], ours[0]["Id"]);
    assert_eq!(theirs[0]["RepoTags"], ours[0]["RepoTags"]);
    let history = ok(&g, &d.addr, &["history", &name]);
    assert!(history.starts_with("IMAGE"), "{history}");

    let copy = format!("{}/test/copy:v2", reg.addr());
    ok(&g, &d.addr, &["tag", &name, &copy]);
    // `docker images REPO` and `--filter` are Docker's filters.
    let only = ok(
        &g,
        &d.addr,
        &[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            &format!("{}/test/copy", reg.addr()),
        ],
    );
    assert_eq!(only.trim(), copy, "{only}");
    let dangling = ok(&g, &d.addr, &["images", "-q", "--filter", "dangling=true"]);
    assert!(dangling.trim().is_empty(), "{dangling}");
    assert!(g.ok(&["images"]).contains("test/copy"), "the tag is in the store");
    let removed = ok(&g, &d.addr, &["rmi", &copy]);
    assert!(removed.contains(&format!("Untagged: {copy}")), "{removed}");

    // docker save | docker load, through the daemon.
    let archive = g.scratch().join("saved.tar");
    ok(&g, &d.addr, &["save", "-o", archive.to_str().unwrap(), &name]);
    ok(&g, &d.addr, &["rmi", &name]);
    let loaded = ok(&g, &d.addr, &["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains(&format!("Loaded image: {name}")), "{loaded}");

    // docker push, to another repository of the registry.
    let pushed = format!("{}/test/pushed:v1", reg.addr());
    ok(&g, &d.addr, &["tag", &name, &pushed]);
    let out = ok(&g, &d.addr, &["push", &pushed]);
    assert!(out.contains("v1: digest: sha256:"), "{out}");
    let back = Gantry::new();
    back.ok(&["pull", &pushed]);

    // docker image prune: an image no name points at goes.
    let id = theirs[0]["Id"].as_str().unwrap().to_string();
    let untagged = g.scratch().join("untagged.tar");
    ok(&g, &d.addr, &["save", "-o", untagged.to_str().unwrap(), &id]);
    ok(&g, &d.addr, &["rmi", "-f", &name, &pushed]);
    ok(&g, &d.addr, &["load", "-i", untagged.to_str().unwrap()]);
    let pruned = ok(&g, &d.addr, &["image", "prune", "-f"]);
    assert!(pruned.contains(&id), "{pruned}");
    assert!(!ok(&g, &d.addr, &["images", "-q", "--no-trunc"]).contains(&id));

    // Errors are Docker's: a missing image, and routes not served.
    let out = docker(&g, &d.addr, &["image", "inspect", "nothing:here"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such image"),
        "{out:?}"
    );
    let out = docker(&g, &d.addr, &["ps"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not implemented"), "{err}");
    let out = docker(&g, &d.addr, &["pull", &format!("{}/test/none:v1", reg.addr())]);
    assert!(!out.status.success(), "a missing image fails the pull");
    g.fsck_clean();
}

#[test]
fn docker_import_and_image_prune_with_filters_through_the_daemon() {
    if !require("docker") {
        return;
    }
    use gantry_tests::image::{compress, rich_layers, Compression};
    let g = Gantry::new();
    let d = g.daemon();
    let base = rich_layers().remove(0);
    let tar = g.scratch().join("rootfs.tar");
    std::fs::write(&tar, &base).unwrap();
    let t = tar.to_str().unwrap();

    // `docker import` with changes and a message: the CLI prints the ID.
    let id = ok(
        &g,
        &d.addr,
        &[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            "--change",
            "LABEL tier=a",
            "-m",
            "made by hand",
            t,
            "test/a:v1",
        ],
    );
    let id = id.trim().to_string();
    assert!(id.starts_with("sha256:"), "{id}");
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&g, &d.addr, &["image", "inspect", "test/a:v1"])).unwrap();
    assert_eq!(inspect[0]["Id"], serde_json::json!(id));
    assert_eq!(inspect[0]["Comment"], serde_json::json!("made by hand"));
    assert_eq!(inspect[0]["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(inspect[0]["Config"]["Labels"], serde_json::json!({"tier": "a"}));
    // The same image the CLI's export shows: the tarball, file by file.
    let out = g.scratch().join("a.tar");
    g.ok(&["export", "test/a:v1", "-o", out.to_str().unwrap()]);
    gantry_tests::tree::assert_same(
        &gantry_tests::tree::of_tar(std::fs::File::open(&out).unwrap()),
        &gantry_tests::tree::of_tar(&base[..]),
        "the imported image",
    );
    // From standard input, gzip-compressed, and one left untagged.
    let gz = g.scratch().join("rootfs.tar.gz");
    std::fs::write(&gz, compress(&base, Compression::Gzip).0).unwrap();
    let piped = docker_command(&g, &d.addr)
        .args(["import", "--change", "LABEL tier=b", "-", "test/b:v1"])
        .stdin(std::fs::File::open(&gz).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success(), "{piped:?}");
    let dangling = ok(&g, &d.addr, &["import", t]).trim().to_string();
    // A bad change is the daemon's 400 (which the client gets although it
    // is still sending a large tarball), and nothing is made.
    let big = g.scratch().join("big.tar");
    std::fs::write(
        &big,
        gantry_tests::image::Layer::new()
            .file("big", 0o644, &vec![7u8; 16 << 20])
            .tar(),
    )
    .unwrap();
    let out = docker(
        &g,
        &d.addr,
        &["import", "--change", "RUN rm -rf /", big.to_str().unwrap(), "test/c:v1"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RUN is not a valid change command"), "{err}");
    let out = docker(&g, &d.addr, &["import", "http://127.0.0.1:1/rootfs.tar"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not supported"),
        "{out:?}"
    );
    let listed = |g: &Gantry| ok(g, &d.addr, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert_eq!(listed(&g).lines().count(), 3, "{}", listed(&g));

    // prune: the untagged one only; then with -a, by label, by age.
    let pruned = ok(&g, &d.addr, &["image", "prune", "-f"]);
    assert!(pruned.contains(&dangling), "{pruned}");
    assert!(!listed(&g).contains("<none>"), "{}", listed(&g));
    let pruned = ok(
        &g,
        &d.addr,
        &["image", "prune", "-a", "-f", "--filter", "until=2000-01-01T00:00:00Z"],
    );
    assert!(pruned.contains("reclaimed space: 0B"), "nothing is that old: {pruned}");
    let pruned = ok(&g, &d.addr, &["image", "prune", "-a", "-f", "--filter", "label=tier=b"]);
    assert!(pruned.contains("untagged: test/b:v1"), "{pruned}");
    assert!(!pruned.contains("test/a"), "{pruned}");
    let pruned = ok(
        &g,
        &d.addr,
        &["image", "prune", "-a", "-f", "--filter", "label!=tier=a"],
    );
    assert!(!pruned.contains("test/a"), "{pruned}");
    assert_eq!(listed(&g).trim(), "test/a:v1");
    let out = docker(&g, &d.addr, &["image", "prune", "-f", "--filter", "colour=red"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid filter"),
        "{out:?}"
    );
    let pruned = ok(&g, &d.addr, &["image", "prune", "-a", "-f"]);
    assert!(pruned.contains(&id), "{pruned}");
    assert_eq!(listed(&g).trim(), "");
    g.fsck_clean();
}

#[test]
fn the_daemon_listens_on_loopback_tcp_when_asked_and_refuses_other_addresses() {
    if !require("docker") {
        return;
    }
    let g = Gantry::new();
    let sock = g.scratch().join("d.sock");
    let unix = format!("unix://{}", sock.display());
    let mut daemon = g.spawn(&["daemon", "-H", "tcp://127.0.0.1:0", "-H", &unix]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let tcp = loop {
        let log = g.spawned_log();
        // Whole lines only (one may be half written).
        let whole = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(addr) = whole
            .lines()
            .find_map(|l| l.strip_prefix("gantry daemon: listening on tcp://"))
        {
            if whole.contains(&format!("listening on {unix}\n")) {
                break format!("tcp://{addr}");
            }
        }
        assert!(std::time::Instant::now() < deadline, "the daemon never listened: {log}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let version = ok(&g, &tcp, &["version", "--format", "{{.Server.APIVersion}}"]);
    assert_eq!(version.trim(), "1.47");
    // One engine behind both: made over TCP, listed over the socket.
    let tar = g.scratch().join("rootfs.tar");
    std::fs::write(&tar, gantry_tests::image::Layer::new().file("f", 0o644, b"f\n").tar()).unwrap();
    ok(&g, &tcp, &["import", tar.to_str().unwrap(), "test/tcp:v1"]);
    assert!(ok(&g, &unix, &["images"]).contains("test/tcp"));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    assert!(!sock.exists());
    // An address other machines reach needs saying so; a name is not an
    // address.
    let err = g.fails(&["daemon", "-H", "tcp://0.0.0.0:0"]);
    assert!(err.contains("--allow-remote-tcp"), "{err}");
    let err = g.fails(&["daemon", "-H", "tcp://localhost:2375"]);
    assert!(err.contains("must be an IP address"), "{err}");
    let err = g.fails(&["daemon", "-H", "ssh://host"]);
    assert!(err.contains("unix:///PATH or tcp://HOST:PORT"), "{err}");
}

#[test]
fn a_tenant_s_socket_answers_its_own_group_only() {
    if !(gantry_tests::is_root() && require("setpriv") && require("curl")) {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let g = Gantry::new();
    // Directories another user may pass through (to reach the sockets).
    let dir = g.scratch().join("sockets");
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = dir.clone();
    while p != std::path::Path::new("/") {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o711)).unwrap();
        p.pop();
    }
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let file = dir.join("tenants.toml");
    let driver = format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        Gantry::test_driver()
    );
    std::fs::write(dir.join("t.toml"), &driver).unwrap();
    std::fs::write(
        &file,
        format!(
            "[[tenant]]\nname = \"a\"\nsocket = \"{}\"\nroot = \"{}\"\nconfig = \"{}\"\ngroup = 4201\n\n[[tenant]]\nname = \"b\"\nsocket = \"{}\"\nroot = \"{}\"\nconfig = \"{}\"\ngroup = \"4202\"\n",
            a_sock.display(),
            g.scratch().join("a-root").display(),
            dir.join("t.toml").display(),
            b_sock.display(),
            g.scratch().join("b-root").display(),
            dir.join("t.toml").display(),
        ),
    )
    .unwrap();
    let mut daemon = spawn_tenants(&g, &file, 2);
    for (sock, gid) in [(&a_sock, 4201), (&b_sock, 4202)] {
        let m = std::fs::metadata(sock).unwrap();
        assert_eq!((m.gid(), m.mode() & 0o777), (gid, 0o660), "{}", sock.display());
    }
    // Another user in tenant a's group reaches a's socket, never b's.
    let ping = |sock: &std::path::Path| {
        Command::new("setpriv")
            .args([
                "--reuid=1000",
                "--regid=4201",
                "--clear-groups",
                "curl",
                "-sS",
                "--unix-socket",
            ])
            .arg(sock)
            .arg("http://tenant/_ping")
            .output()
            .unwrap()
    };
    let a = ping(&a_sock);
    assert_eq!(String::from_utf8_lossy(&a.stdout), "OK", "{a:?}");
    let b = ping(&b_sock);
    assert!(!b.status.success(), "tenant a's user reached tenant b: {b:?}");
    // (curl says only that it could not connect: b itself answers.)
    let r = get(&format!("unix://{}", b_sock.display()), "GET", "/_ping");
    assert!(r.ends_with("OK"), "{r}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    // A group that does not exist is refused before anything listens.
    let err = g.fails(&[
        "daemon",
        "-H",
        &format!("unix://{}", dir.join("c.sock").display()),
        "-G",
        "no-such-group-here",
    ]);
    assert!(err.contains("no group no-such-group-here"), "{err}");
    assert!(!dir.join("c.sock").exists());
}

#[test]
fn the_client_s_credentials_reach_the_registry_through_x_registry_auth() {
    if !(peers() && require("docker")) {
        return;
    }
    use gantry_tests::proxy::Proxy;
    let reg = Registry::start();
    publish(&reg, "test/app", "v1", &control_image());
    let proxy = Proxy::alice_only(reg.port);
    // gantry's own config has no credentials: only the client's can work.
    let g = Gantry::new();
    let d = g.daemon();
    let name = format!("{}/test/app:v1", proxy.addr());
    let out = docker(&g, &d.addr, &["pull", &name]);
    assert!(!out.status.success(), "pulled without credentials");
    // `docker login` through the daemon: the token server refuses a wrong
    // password; the right one is checked (a token issued) and the client
    // keeps it in its own config.json, which its pulls then send.
    let out = login(&g, &d.addr, &proxy.addr(), "alice", "wrong");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    let issued = proxy.seen.lock().unwrap().tokens_issued;
    let out = login(&g, &d.addr, &proxy.addr(), "alice", "s3cret");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Login Succeeded"),
        "{out:?}"
    );
    assert!(proxy.seen.lock().unwrap().tokens_issued > issued);
    let pulled = ok(&g, &d.addr, &["pull", &name]);
    assert!(pulled.contains("Status: Downloaded newer image"), "{pulled}");
}

/// `docker login SERVER -u USER --password-stdin` against the daemon.
pub(crate) fn login(g: &Gantry, host: &str, server: &str, user: &str, password: &str) -> Output {
    use std::io::Write;
    let mut child = docker_command(g, host)
        .args(["login", server, "-u", user, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn docker_login_through_the_daemon_checks_basic_credentials_with_the_registry() {
    if !require("docker") {
        return;
    }
    // A registry that challenges with Basic at /v2/: gantry serve with an
    // htpasswd file.
    let server = Gantry::new();
    let file = server.scratch().join("htpasswd");
    std::fs::write(&file, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let srv = server.serve(&["--htpasswd", file.to_str().unwrap()]);
    let g = Gantry::new();
    let d = g.daemon();
    let out = login(&g, &d.addr, &srv.addr, "alice", "nope");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "login attempt to http://{}/v2/ failed with status: 401",
            srv.addr
        )),
        "{err}"
    );
    let out = login(&g, &d.addr, &srv.addr, "alice", "s3cret");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Login Succeeded"));
    // Where nothing answers, the error says so; bad bodies are a 400.
    let out = login(&g, &d.addr, "127.0.0.1:1", "alice", "x");
    assert!(!out.status.success());
    let r = raw(
        &d.addr,
        b"POST /v1.47/auth HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Length: 5\r\n\r\n{bad}",
    );
    assert_eq!(status(&r), 400, "{r}");
    let r = raw(
        &d.addr,
        b"POST /auth HTTP/1.1\r\nHost: d\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(status(&r), 400, "{r}");
}

#[test]
fn twenty_clients_pulling_tagging_listing_and_removing_at_once_lose_nothing() {
    if !(peers() && require("docker")) {
        return;
    }
    use gantry_tests::image::{rich_layers, Image};
    use gantry_tests::proxy::{Faults, Proxy};
    let reg = Registry::start();
    let (_a, _, mut layers) = publish(&reg, "test/a", "v1", &Image::new(rich_layers()));
    let (_b, _, more) = publish(&reg, "test/b", "v1", &control_image());
    layers.extend(more);
    // The proxy counts what the registry was asked for.
    let proxy = Proxy::start(reg.port, Faults::default());
    let images = [
        format!("{}/test/a:v1", proxy.addr()),
        format!("{}/test/b:v1", proxy.addr()),
    ];
    let g = Gantry::new();
    let d = g.daemon();
    std::thread::scope(|s| {
        for i in 0..20 {
            let (g, d, images) = (&g, &d, &images);
            s.spawn(move || {
                let image = &images[i % 2];
                ok(g, &d.addr, &["pull", "-q", image]);
                let mine = format!("client/{i}:v1");
                ok(g, &d.addr, &["tag", image, &mine]);
                ok(g, &d.addr, &["images"]);
                if i % 2 == 0 {
                    ok(g, &d.addr, &["rmi", &mine]);
                }
            });
        }
    });
    let listed = ok(&g, &d.addr, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    for i in 0..20 {
        assert_eq!(
            listed.contains(&format!("client/{i}:v1")),
            i % 2 == 1,
            "client {i}: {listed}"
        );
    }
    // Every layer was fetched once, however many clients wanted it at once
    // (configs are small and read per pull, as dockerd does).
    let seen = proxy.seen.lock().unwrap();
    for l in &layers {
        assert_eq!(
            seen.blob_gets.get(&l.digest),
            Some(&1),
            "{} fetched {:?} times",
            l.digest,
            seen.blob_gets.get(&l.digest)
        );
    }
    drop(seen);
    let out = g.ok(&["fsck", "--verify-content"]);
    assert!(out.contains("store is consistent"), "{out}");
}

#[test]
fn the_python_docker_sdk_drives_the_image_calls() {
    if !peers() {
        return;
    }
    let Some(python) = gantry_tests::venv_python("docker") else {
        return;
    };
    let reg = Registry::start();
    publish(&reg, "test/app", "v1", &control_image());
    let g = Gantry::new();
    let d = g.daemon();
    let script = r#"
import sys, docker
host, name, copy, host_reg = sys.argv[1:5]
c = docker.DockerClient(base_url=host)
assert c.ping()
img = c.images.pull(name)
assert name in img.tags, img.tags
assert any(name in i.tags for i in c.images.list())
assert img.tag(copy.rsplit(":", 1)[0], tag=copy.rsplit(":", 1)[1])
assert copy in c.images.get(copy).tags
data = b"".join(c.images.get(copy).save(named=copy))
c.images.remove(copy)
assert not any(copy in i.tags for i in c.images.list())
loaded = c.images.load(data)
assert copy in loaded[0].tags, loaded[0].tags
try:
    c.images.get("nothing:here")
    sys.exit("found a missing image")
except docker.errors.ImageNotFound:
    pass
assert c.info()["Images"] == 1, c.info()  # one image under two names
# An import from bytes, with a change; then prune with a filter.
import io, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as t:
    f = tarfile.TarInfo("hello.txt"); body = b"hello\n"; f.size = len(body)
    t.addfile(f, io.BytesIO(body))
c.api.import_image_from_data(buf.getvalue(), repository="test/imported", tag="v1", changes=["LABEL made=sdk"])
assert c.images.get("test/imported:v1").labels == {"made": "sdk"}
pruned = c.images.prune(filters={"dangling": False, "label": "made=sdk"})
assert any("test/imported:v1" in (d.get("Untagged") or "") for d in pruned["ImagesDeleted"]), pruned
# No authentication on this registry: any credentials are taken, as dockerd does.
assert c.login(username="u", password="p", registry=host_reg)["Status"] == "Login Succeeded"
print("ok", img.id)
"#;
    let name = format!("{}/test/app:v1", reg.addr());
    let copy = format!("{}/test/copy:v2", reg.addr());
    let out = Command::new(python)
        .args(["-c", script, &d.addr, &name, &copy, &reg.addr()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok sha256:"));
}

/// Sends `request` as is over the daemon's socket and reads until it closes.
pub(crate) fn raw(host: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let path = host.strip_prefix("unix://").unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap_or_else(|e| panic!("connecting to {path}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(host: &str, method: &str, path: &str) -> String {
    raw(
        host,
        format!("{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
}

pub(crate) fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

pub(crate) fn message(resp: &str) -> String {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {resp}"));
    v["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn bad_requests_get_the_engine_api_error_and_the_daemon_keeps_serving() {
    let g = Gantry::new();
    let d = g.daemon();
    let h = &d.addr;
    // Unknown routes: 501 with Docker's error JSON, never a hang.
    let r = get(h, "GET", "/v1.47/containers/json");
    assert_eq!(status(&r), 501, "{r}");
    assert!(message(&r).contains("not implemented"), "{r}");
    // A version newer than the daemon's, and an older one than it accepts.
    let r = get(h, "GET", "/v9.99/images/json");
    assert_eq!(status(&r), 400, "{r}");
    assert!(message(&r).contains("too new"), "{r}");
    assert_eq!(status(&get(h, "GET", "/v1.10/images/json")), 400);
    // Bad names: a plain 400 before any stream starts; a missing image 404.
    let r = get(h, "POST", "/images/create?fromImage=Bad%2F..%2Fname&tag=x");
    assert_eq!(status(&r), 400, "{r}");
    assert!(message(&r).contains("invalid reference"), "{r}");
    let r = get(h, "POST", "/images/x%2F..%2Fy/push");
    assert_eq!(status(&r), 400, "{r}");
    let r = get(h, "GET", "/images/json?filters=%7B%22color%22%3A%5B%22red%22%5D%7D");
    assert_eq!(status(&r), 400, "{r}");
    assert!(message(&r).contains("invalid filter"), "{r}");
    let r = get(h, "GET", "/images/nothing:here/json");
    assert_eq!(status(&r), 404, "{r}");
    assert!(message(&r).contains("No such image"), "{r}");
    // Garbage and an oversized head: refused, the connection closed.
    let r = raw(h, b"\x00\x01garbage\r\n\r\n");
    assert!(r.is_empty() || status(&r) == 400, "{r}");
    let big = format!(
        "GET /_ping HTTP/1.1\r\nHost: d\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let r = raw(h, big.as_bytes());
    assert!(
        r.is_empty() || status(&r) == 431 || status(&r) == 400,
        "{}",
        &r[..r.len().min(200)]
    );
    // Hundreds of idle connections do not keep a client out (a few hundred:
    // the test process shares its file limit with the tests beside it).
    let idle: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(h.strip_prefix("unix://").unwrap()).unwrap())
        .collect();
    let r = get(h, "GET", "/_ping");
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        r.contains("Api-Version: 1.47") || r.to_lowercase().contains("api-version: 1.47"),
        "{r}"
    );
    drop(idle);
    let r = get(h, "GET", "/images/json");
    assert_eq!((status(&r), r.ends_with("[]")), (200, true), "{r}");
}

#[test]
fn a_client_that_disconnects_mid_pull_cancels_it_and_the_store_stays_consistent() {
    if !peers() {
        return;
    }
    use gantry_tests::image::{rich_layers, Image};
    use gantry_tests::proxy::{Faults, Proxy};
    use std::io::{Read, Write};
    let reg = Registry::start();
    let (_p, _, layers) = publish(&reg, "test/slow", "v1", &Image::new(rich_layers()));
    let proxy = Proxy::start(
        reg.port,
        Faults {
            delay_blob: Some((layers.last().unwrap().digest.clone(), std::time::Duration::from_secs(2))),
            ..Default::default()
        },
    );
    let g = Gantry::new();
    let d = g.daemon();
    let path = d.addr.strip_prefix("unix://").unwrap().to_string();
    {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let req = format!(
            "POST /v1.47/images/create?fromImage={}%2Ftest%2Fslow&tag=v1 HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n",
            proxy.addr()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut first = [0u8; 64];
        let n = s.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        // The client goes away while the last layer is still on its way.
    }
    std::thread::sleep(std::time::Duration::from_secs(4));
    let listed = g.ok(&["images"]);
    assert!(
        !listed.contains("test/slow"),
        "a cancelled pull registered its image: {listed}"
    );
    g.fsck_clean();
    // The daemon goes on serving, and the same pull completes for a client that stays.
    let r = get(&d.addr, "GET", "/_ping");
    assert_eq!(status(&r), 200);
    if require("docker") {
        ok(&g, &d.addr, &["pull", "-q", &format!("{}/test/slow:v1", proxy.addr())]);
        assert!(g.ok(&["images"]).contains("test/slow"));
    }
}

/// `POST /images/create` over `socket`, read to its end: the progress stream.
fn api_pull(socket: &std::path::Path, name: &str) -> String {
    let (image, tag) = name.rsplit_once(':').unwrap();
    let image = image.replace('/', "%2F");
    let host = format!("unix://{}", socket.display());
    get(
        &host,
        "POST",
        &format!("/v1.47/images/create?fromImage={image}&tag={tag}"),
    )
}

/// Layers that take a pull real work: text that compresses about 4×, in
/// many files, so a pull spends a second or so inflating, hashing and
/// writing.
fn busy_layers() -> Vec<Vec<u8>> {
    use gantry_tests::image::Layer;
    const WORDS: [&str; 16] = [
        "layer ", "image ", "tenant ", "driver ", "socket ", "digest ", "pull ", "store ", "blob ", "mount ", "quota ",
        "plugin ", "sandbox ", "limit ", "epoch ", "guest\n",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..8)
        .map(|l| {
            let mut layer = Layer::new().dir(&format!("d{l}"), 0o755);
            for f in 0..300 {
                let mut text = Vec::with_capacity(64 << 10);
                while text.len() < 64 << 10 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    text.extend_from_slice(WORDS[(x >> 60) as usize].as_bytes());
                }
                layer = layer.file(&format!("d{l}/f{f}"), 0o644, &text);
            }
            layer.tar()
        })
        .collect()
}

fn median(mut v: Vec<std::time::Duration>) -> std::time::Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn tenants_have_their_own_stores_and_a_looping_plugin_does_not_slow_another_tenant() {
    if !peers() {
        return;
    }
    use gantry_tests::image::Image;
    let reg = Registry::start();
    publish(&reg, "test/busy", "v1", &Image::new(busy_layers()));
    publish(&reg, "test/tiny", "v1", &control_image());
    let name = format!("{}/test/busy:v1", reg.addr());
    let tiny = format!("{}/test/tiny:v1", reg.addr());
    let g = Gantry::new();
    let dir = g.scratch().join("tenants");
    std::fs::create_dir_all(&dir).unwrap();
    // Tenant a's driver loops forever in every apply (its CPU deadline
    // stops each call); tenant b is ordinary, limited to one registry.
    let a_config = dir.join("a.toml");
    std::fs::write(
        &a_config,
        format!(
            "[transport]\ntype = \"v2\"\n[driver]\ntype = \"bad\"\npath = \"{}\"\noptions = {{ mode = \"loop\" }}\n[limits]\ncpu_seconds = 2.0\nwall_seconds = 5.0\n",
            crate::sandbox::component("gantry_bad_driver").display()
        ),
    )
    .unwrap();
    let b_config = dir.join("b.toml");
    std::fs::write(
        &b_config,
        format!(
            "allowed_registries = [\"{}\"]\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
            reg.addr(),
            Gantry::test_driver()
        ),
    )
    .unwrap();
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let file = dir.join("tenants.toml");
    std::fs::write(
        &file,
        format!(
            "[[tenant]]\nname = \"a\"\nsocket = \"{}\"\nroot = \"{}\"\nconfig = \"{}\"\n\n[[tenant]]\nname = \"b\"\nsocket = \"{}\"\nroot = \"{}\"\nconfig = \"{}\"\n",
            a_sock.display(),
            dir.join("a-root").display(),
            a_config.display(),
            b_sock.display(),
            dir.join("b-root").display(),
            b_config.display()
        ),
    )
    .unwrap();
    let mut daemon = g.spawn(&["daemon", "--tenants", file.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !(a_sock.exists() && b_sock.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the tenants' sockets never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let b_host = format!("unix://{}", b_sock.display());
    let time_b = || {
        let t = std::time::Instant::now();
        let out = api_pull(&b_sock, &name);
        let took = t.elapsed();
        assert!(out.contains("Status: Downloaded newer image"), "{out}");
        let r = get(&b_host, "DELETE", &format!("/images/{}", name.replace('/', "%2F")));
        assert_eq!(status(&r), 200, "{r}");
        took
    };
    // Tenant b alone (once to warm up, then five timed), then five times
    // while tenant a's pulls keep its looping driver busy throughout.
    time_b();
    let alone: Vec<_> = (0..5).map(|_| time_b()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = std::thread::spawn({
        let (a_sock, tiny, stop) = (a_sock.clone(), tiny.clone(), stop.clone());
        move || {
            let mut outs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                outs.push(api_pull(&a_sock, &tiny));
            }
            outs
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let beside: Vec<_> = (0..5).map(|_| time_b()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let a_outs = looper.join().unwrap();
    eprintln!("tenant b's pulls alone: {alone:?}; beside tenant a's looping driver: {beside:?}");
    let (alone, beside) = (median(alone), median(beside));
    eprintln!(
        "tenant b's pull (median of 5): {alone:?} alone, {beside:?} beside tenant a's looping driver ({:+.1} %)",
        (beside.as_secs_f64() / alone.as_secs_f64() - 1.0) * 100.0
    );
    for a_out in &a_outs {
        // Its CPU deadline, or (held to its share while b works) its
        // wall-clock one.
        assert!(
            a_out.contains("plugin driver/bad ran past its") && a_out.contains("deadline"),
            "tenant a's pull should fail: {a_out}"
        );
    }
    // Loosely: the test shares two cores with the rest of the suite.
    assert!(
        beside.as_secs_f64() <= alone.as_secs_f64() * 1.5 + 0.3,
        "tenant b slowed from {alone:?} to {beside:?}"
    );
    // Each tenant sees its own store only; b's allow-list holds.
    let out = api_pull(&b_sock, &name);
    assert!(out.contains("Status: Downloaded newer image"), "{out}");
    let r = get(&format!("unix://{}", a_sock.display()), "GET", "/images/json");
    assert!(r.ends_with("[]"), "tenant a sees: {r}");
    let r = get(&b_host, "GET", "/images/json");
    assert!(r.contains("test/busy"), "{r}");
    let r = get(&b_host, "POST", "/images/create?fromImage=127.0.0.1:1%2Fother&tag=v1");
    assert_eq!(status(&r), 403, "{r}");
    assert!(message(&r).contains("not allowed"), "{r}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    assert!(
        !a_sock.exists() && !b_sock.exists(),
        "sockets are removed at exit: {}",
        g.spawned_log()
    );
}

/// The docker CLI of one client of the daemon: its own config directory,
/// so what it logs in with is its own.
fn client(g: &Gantry, host: &str, who: &str) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", host).env(
        "DOCKER_CONFIG",
        docker_config(&g.scratch().join(format!("docker-config-{who}"))),
    );
    c
}

/// `docker login` as client `who`.
fn login_as(g: &Gantry, host: &str, who: &str, server: &str, user: &str, password: &str) -> Output {
    use std::io::Write;
    let mut child = client(g, host, who)
        .args(["login", server, "-u", user, "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// An Engine API request with `X-Registry-Auth` set to these credentials
/// (a client that sends wrong ones, as the CLI never would after a failed
/// login).
fn with_auth(host: &str, method: &str, path: &str, user: &str, password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::URL_SAFE
        .encode(serde_json::json!({"username": user, "password": password}).to_string());
    raw(
        host,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nX-Registry-Auth: {auth}\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
}

/// A small root filesystem, imported through the daemon as `name`.
fn import_as(g: &Gantry, host: &str, name: &str) {
    let tar = g.scratch().join("creds-rootfs.tar");
    std::fs::write(
        &tar,
        gantry_tests::image::Layer::new().file("owner", 0o644, b"alice\n").tar(),
    )
    .unwrap();
    let out = client(g, host, "importer")
        .args(["import", tar.to_str().unwrap(), name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn succeeded(out: &Output) -> bool {
    out.status.success()
}

#[test]
fn clients_of_one_daemon_never_share_registry_credentials() {
    if !(require("docker-registry") && require("docker") && require("openssl")) {
        return;
    }
    use gantry_tests::token::TokenServer;
    let tokens = TokenServer::start(&[("alice", "s3cret"), ("bob", "hunter2")]);
    let reg = Registry::start_token_auth(&tokens);
    let g = Gantry::new();
    let d = g.daemon();
    let h = &d.addr;
    let server = reg.addr();
    let app = format!("{server}/alice/app");
    import_as(&g, h, &format!("{app}:v1"));

    // Alice logs in and pushes her repository.
    let out = login_as(&g, h, "alice", &server, "alice", "s3cret");
    assert!(succeeded(&out), "{out:?}");
    let out = client(&g, h, "alice")
        .args(["push", &format!("{app}:v1")])
        .output()
        .unwrap();
    assert!(succeeded(&out), "alice's push: {out:?}");
    assert_eq!(tokens.tags(&server, "alice/app"), ["v1"]);

    // Another client's login is checked with the registry, whatever alice
    // did before it: a wrong password and an unknown user are refused.
    let refused_before = *tokens.refused.lock().unwrap();
    for (user, password) in [("alice", "wrong"), ("mallory", "s3cret")] {
        let out = login_as(&g, h, "mallory", &server, user, password);
        assert!(
            !succeeded(&out),
            "a login as {user}/{password} succeeded after alice's: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("unauthorized") || err.contains("401"), "{err}");
    }
    assert_eq!(
        *tokens.refused.lock().unwrap(),
        refused_before + 2,
        "each wrong login reached the token server"
    );

    // A client with no credentials, one with wrong ones and one with
    // another user's push nothing into alice's repository.
    let evil = format!("{app}:evil");
    ok(&g, h, &["tag", &format!("{app}:v1"), &evil]);
    let out = client(&g, h, "mallory").args(["push", &evil]).output().unwrap();
    assert!(!succeeded(&out), "a push with no credentials: {out:?}");
    let path = format!("/v1.47/images/{}/push?tag=evil", app.replace('/', "%2F"));
    let r = with_auth(h, "POST", &path, "alice", "wrong");
    assert!(!r.contains("digest: sha256:"), "a push with a wrong password: {r}");
    assert!(r.to_lowercase().contains("unauthorized"), "{r}");
    let out = login_as(&g, h, "bob", &server, "bob", "hunter2");
    assert!(succeeded(&out), "bob's own login: {out:?}");
    let out = client(&g, h, "bob").args(["push", &evil]).output().unwrap();
    assert!(!succeeded(&out), "bob pushed into alice's repository: {out:?}");
    assert_eq!(tokens.tags(&server, "alice/app"), ["v1"], "nothing but alice's tag");

    // The same for pulls of her private repository.
    ok(&g, h, &["rmi", "-f", &format!("{app}:v1"), &evil]);
    for who in ["mallory", "bob"] {
        let out = client(&g, h, who)
            .args(["pull", &format!("{app}:v1")])
            .output()
            .unwrap();
        assert!(!succeeded(&out), "{who} pulled alice's image: {out:?}");
    }
    let r = with_auth(
        h,
        "POST",
        &format!("/v1.47/images/create?fromImage={}&tag=v1", app.replace('/', "%2F")),
        "alice",
        "wrong",
    );
    assert!(!r.contains("Status: Downloaded"), "a pull with a wrong password: {r}");
    assert!(
        !ok(&g, h, &["images", "--format", "{{.Repository}}"]).contains("alice/app"),
        "nothing was pulled"
    );
    // Credentials that cannot be read are the client's error, never a
    // pull with no credentials (nor with anyone else's).
    let r = raw(
        h,
        format!(
            "POST /v1.47/images/create?fromImage={}&tag=v1 HTTP/1.1\r\nHost: d\r\nConnection: close\r\nX-Registry-Auth: not*base64\r\nContent-Length: 0\r\n\r\n",
            app.replace('/', "%2F")
        )
        .as_bytes(),
    );
    assert_eq!(status(&r), 400, "{r}");
    assert!(message(&r).contains("X-Registry-Auth"), "{r}");
    // Alice still can.
    let out = client(&g, h, "alice")
        .args(["pull", &format!("{app}:v1")])
        .output()
        .unwrap();
    assert!(succeeded(&out), "alice's pull: {out:?}");
    g.fsck_clean();
}

/// `gantry daemon --tenants FILE`, once its `count` tenants listen.
pub(crate) fn spawn_tenants(g: &Gantry, file: &std::path::Path, count: usize) -> std::process::Child {
    let mut daemon = g.spawn(&["daemon", "--tenants", file.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while g.spawned_log().matches("listening on").count() < count {
        assert!(std::time::Instant::now() < deadline, "{}", g.spawned_log());
        assert!(daemon.try_wait().unwrap().is_none(), "{}", g.spawned_log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon
}

/// The tenants file for `tenants` (name, config text), each with its own
/// socket and root in `dir`, and its config named relative to the file
/// (which means beside it); returns the sockets.
fn tenants(dir: &std::path::Path, tenants: &[(&str, String)]) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut file = String::new();
    let mut sockets = Vec::new();
    for (name, config) in tenants {
        std::fs::write(dir.join(format!("{name}.toml")), config).unwrap();
        let sock = dir.join(format!("{name}.sock"));
        file.push_str(&format!(
            "[[tenant]]\nname = \"{name}\"\nsocket = \"{}\"\nroot = \"{}\"\nconfig = \"{name}.toml\"\n\n",
            sock.display(),
            dir.join(format!("{name}-root")).display(),
        ));
        sockets.push(sock);
    }
    let path = dir.join("tenants.toml");
    std::fs::write(&path, file).unwrap();
    (path, sockets)
}

#[test]
fn a_tenant_gets_only_its_own_credentials_never_the_daemon_s() {
    if !(require("docker-registry") && require("docker") && require("openssl")) {
        return;
    }
    use gantry_tests::token::TokenServer;
    let tokens = TokenServer::start(&[("alice", "s3cret")]);
    let reg = Registry::start_token_auth(&tokens);
    let server = reg.addr();
    let mut g = Gantry::new();
    // The operator's own login, in the daemon's environment.
    let operator = crate::docker_config(&g, &server, "alice", "s3cret");
    g.env.push(("DOCKER_CONFIG".into(), operator.display().to_string()));
    let dir = g.scratch().join("tenants");
    let driver = format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        Gantry::test_driver()
    );
    // Tenant b names its own auth file (relative: beside its config).
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(operator.join("config.json"), dir.join("b-auth.json")).unwrap();
    let (file, sockets) = tenants(
        &dir,
        &[
            ("a", driver.clone()),
            ("b", format!("auth_file = \"b-auth.json\"\n{driver}")),
        ],
    );
    let mut daemon = spawn_tenants(&g, &file, 2);
    let (a, b) = (
        format!("unix://{}", sockets[0].display()),
        format!("unix://{}", sockets[1].display()),
    );
    for (host, tag) in [(&a, "from-a"), (&b, "from-b")] {
        import_as(&g, host, &format!("{server}/alice/app:{tag}"));
    }
    // Tenant a's client sends nothing: the push has no credentials.
    let out = client(&g, &a, "a")
        .args(["push", &format!("{server}/alice/app:from-a")])
        .output()
        .unwrap();
    assert!(!succeeded(&out), "tenant a pushed with the operator's login: {out:?}");
    assert!(tokens.tags(&server, "alice/app").is_empty());
    // Tenant b's own file is its identity.
    let out = client(&g, &b, "b")
        .args(["push", &format!("{server}/alice/app:from-b")])
        .output()
        .unwrap();
    assert!(succeeded(&out), "tenant b's push with its auth_file: {out:?}");
    assert_eq!(tokens.tags(&server, "alice/app"), ["from-b"]);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());

    // The operator's own daemon neither: like dockerd, it uses what its
    // clients send (or an auth_file its config names), not its environment.
    let d = g.daemon();
    import_as(&g, &d.addr, &format!("{server}/alice/app:from-operator"));
    let out = client(&g, &d.addr, "anyone")
        .args(["push", &format!("{server}/alice/app:from-operator")])
        .output()
        .unwrap();
    assert!(!succeeded(&out), "a client pushed with the daemon's own login: {out:?}");
    assert_eq!(tokens.tags(&server, "alice/app"), ["from-b"]);
}

/// The JSON body of a response `raw` read.
fn json_body(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {resp}"))
}

/// A descriptor as an index lists it, with a platform.
fn index_entry(d: &gantry_tests::image::Desc, platform: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"mediaType": d.media_type, "digest": d.digest, "size": d.size, "platform": platform})
}

#[test]
fn distribution_inspect_resolves_a_reference_at_its_registry_as_dockerd_does() {
    if !peers() {
        return;
    }
    use gantry_tests::image::{Image, Layer, Layout};
    use gantry_tests::proxy::Proxy;
    use serde_json::json;
    let reg = Registry::start();
    let (_single, single, _) = publish(&reg, "test/app", "v1", &control_image());
    // An index of three platforms: one with a variant, one with Windows'
    // os.version and os.features (Docker's platform keys).
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let image = |arch: &'static str, os: &'static str, file: &[u8]| {
        let mut i = Image::new(vec![Layer::new().file("arch", 0o644, file).tar()]);
        (i.arch, i.os) = (arch, os);
        i
    };
    let (amd, _) = layout.image(&image("amd64", "linux", b"amd64\n"));
    let (arm, _) = layout.image(&image("arm64", "linux", b"arm64\n"));
    let (win, _) = layout.image(&image("amd64", "windows", b"windows\n"));
    let platforms = json!([
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
        {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1", "os.features": ["win32k"]},
    ]);
    let entries: Vec<serde_json::Value> = [amd, arm, win]
        .iter()
        .zip(platforms.as_array().unwrap())
        .map(|(d, p)| index_entry(d, p.clone()))
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    let idx = layout.blob(index.to_string().as_bytes(), "application/vnd.oci.image.index.v1+json");
    layout.tag("multi", &idx, None);
    reg.push(dir.path(), "multi", "test/multi:v1");

    let g = Gantry::new();
    let d = g.daemon();
    let inspect = |name: &str| get(&d.addr, "GET", &format!("/v1.47/distribution/{name}/json"));
    let descriptor = |desc: &gantry_tests::image::Desc| json!({"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size});
    // A single image: its manifest, and the platform its config names.
    let r = inspect(&format!("{}/test/app:v1", reg.addr()));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        json_body(&r),
        json!({"Descriptor": descriptor(&single), "Platforms": [{"architecture": "amd64", "os": "linux"}]}),
        "{r}"
    );
    // An index: every entry's platform, in order; by tag and by digest.
    let r = inspect(&format!("{}/test/multi:v1", reg.addr()));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        json_body(&r),
        json!({"Descriptor": descriptor(&idx), "Platforms": platforms}),
        "{r}"
    );
    let r = inspect(&format!("{}/test/multi@{}", reg.addr(), idx.digest));
    assert_eq!(json_body(&r)["Descriptor"], descriptor(&idx), "{r}");
    // Nothing was pulled.
    assert_eq!(status(&get(&d.addr, "GET", "/images/json")), 200);
    assert!(get(&d.addr, "GET", "/images/json").ends_with("[]"));
    // Unknown: a 404 with Docker's error JSON, for a missing tag and a
    // missing repository; a bad name is a 400.
    for missing in ["test/app:v2", "test/none:v1"] {
        let r = inspect(&format!("{}/{missing}", reg.addr()));
        assert_eq!(status(&r), 404, "{r}");
        assert!(!message(&r).is_empty(), "{r}");
    }
    let r = inspect("Bad%2F..%2Fname");
    assert_eq!(status(&r), 400, "{r}");

    // The Python SDK's registry data: the digest, and its platform check
    // (which compares whole dictionaries, and fills in the daemon's own
    // `Os`/`Arch` from /version).
    if let Some(python) = gantry_tests::venv_python("docker") {
        let script = r#"
import sys, docker
host, single, multi, digest, missing = sys.argv[1:6]
c = docker.DockerClient(base_url=host)
data = c.images.get_registry_data(single)
assert data.id == digest, data.attrs
assert data.has_platform("linux/amd64") and data.has_platform("linux"), data.attrs
assert not data.has_platform("linux/arm64")
m = c.images.get_registry_data(multi)
assert m.has_platform("linux/arm64/v8") and not m.has_platform("linux/s390x"), m.attrs
assert c.api.inspect_distribution(multi)["Descriptor"]["mediaType"] == "application/vnd.oci.image.index.v1+json"
try:
    c.api.inspect_distribution(missing)
    sys.exit("found a missing image")
except docker.errors.NotFound:
    pass
print("ok")
"#;
        let out = Command::new(python)
            .args([
                "-c",
                script,
                &d.addr,
                &format!("{}/test/app:v1", reg.addr()),
                &format!("{}/test/multi:v1", reg.addr()),
                &single.digest,
                &format!("{}/test/none:v1", reg.addr()),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Behind authentication: the client's X-Registry-Auth, as a pull.
    let proxy = Proxy::alice_only(reg.port);
    let path = format!("/distribution/{}/test/app:v1/json", proxy.addr());
    let r = get(&d.addr, "GET", &path);
    assert_eq!(status(&r), 401, "{r}");
    let r = with_auth(&d.addr, "GET", &path, "alice", "wrong");
    assert_eq!(status(&r), 401, "{r}");
    let r = with_auth(&d.addr, "GET", &path, "alice", "s3cret");
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(json_body(&r)["Descriptor"], descriptor(&single), "{r}");

    // A registry outside the allow-list is refused before it is asked.
    let fenced = Gantry::new().with_config(&format!(
        "allowed_registries = [\"registry.example\"]\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        Gantry::test_driver()
    ));
    let fd = fenced.daemon();
    let r = get(
        &fd.addr,
        "GET",
        &format!("/distribution/{}/test/app:v1/json", reg.addr()),
    );
    assert_eq!(status(&r), 403, "{r}");
    assert!(message(&r).contains("not allowed"), "{r}");
}

#[test]
fn version_and_info_carry_every_field_the_engine_api_documents() {
    use serde_json::Value;
    let g = Gantry::new();
    let d = g.daemon();
    let r = get(&d.addr, "GET", "/v1.47/version");
    assert_eq!(status(&r), 200, "{r}");
    let v = json_body(&r);
    // The Engine API's SystemVersion, field by field.
    let go_arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let strings = [
        ("Version", Some(env!("CARGO_PKG_VERSION"))),
        ("ApiVersion", Some("1.47")),
        ("MinAPIVersion", Some("1.24")),
        ("Os", Some("linux")),
        ("Arch", Some(go_arch)),
        ("KernelVersion", Some(kernel.trim())),
        ("GitCommit", None),
        ("GoVersion", None),
        ("BuildTime", None),
    ];
    for (key, want) in strings {
        let got = v[key].as_str().unwrap_or_else(|| panic!("{key} is not a string: {v}"));
        if let Some(want) = want {
            assert_eq!(got, want, "{key}: {v}");
        }
    }
    assert!(v["GoVersion"].as_str().unwrap().starts_with("rustc "), "{v}");
    assert_eq!(v["Experimental"], Value::Bool(false), "{v}");
    assert!(v["Platform"]["Name"].is_string(), "{v}");
    // The one component, the Engine, whose details `docker version` prints.
    let c = &v["Components"][0];
    assert_eq!(
        (c["Name"].as_str(), c["Version"].as_str()),
        (Some("Engine"), v["Version"].as_str())
    );
    for key in [
        "ApiVersion",
        "Arch",
        "BuildTime",
        "Experimental",
        "GitCommit",
        "GoVersion",
        "KernelVersion",
        "MinAPIVersion",
        "Os",
    ] {
        let detail = &c["Details"][key];
        assert!(detail.is_string(), "{key}: {v}");
        if key != "Experimental" {
            assert_eq!(detail, &v[key], "{key}: {v}");
        }
    }
    assert_eq!(v.as_object().unwrap().len(), 12, "only the documented fields: {v}");
    // What the docker CLI reads of them.
    if require("docker") {
        let out = ok(
            &g,
            &d.addr,
            &[
                "version",
                "--format",
                "{{.Server.Os}}/{{.Server.Arch}} {{.Server.APIVersion}} {{.Server.Experimental}}",
            ],
        );
        assert_eq!(out.trim(), format!("linux/{go_arch} 1.47 false"));
        let out = ok(
            &g,
            &d.addr,
            &[
                "info",
                "--format",
                "{{.ExperimentalBuild}} {{.Swarm.LocalNodeState}} {{.Debug}} {{.OSType}}",
            ],
        );
        assert_eq!(out.trim(), "false inactive false linux");
    }
}

/// Sends a request with a `len`-byte body as the client would (all of it
/// before reading), then reads the answer until the daemon closes;
/// whether the whole body could be sent, and the answer.
fn post_body(host: &str, path: &str, len: usize) -> (bool, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(host.strip_prefix("unix://").unwrap()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nContent-Type: application/x-tar\r\nContent-Length: {len}\r\n\r\n"
    );
    let body = vec![b'x'; len];
    let sent = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&body)).is_ok();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (sent, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn unknown_paths_are_404_and_refused_routes_read_the_body_before_answering() {
    let g = Gantry::new();
    let d = g.daemon();
    let h = &d.addr;
    // dockerd's answer to a path it has no route for, with or without a
    // version prefix, and to a method a route does not take.
    for (method, path) in [
        ("GET", "/nonsense"),
        ("GET", "/v1.47/images/x/nonsense"),
        ("PUT", "/images/json"),
        ("POST", "/v1.47/distribution/x/json"),
    ] {
        let r = get(h, method, path);
        assert_eq!(status(&r), 404, "{method} {path}: {r}");
        assert_eq!(message(&r), "page not found", "{r}");
    }
    // The Engine API's routes outside images: still 501.
    for path in [
        "/containers/json",
        "/v1.47/networks",
        "/volumes/prune",
        "/swarm",
        "/exec/x/start",
    ] {
        let r = get(h, "GET", path);
        assert_eq!(status(&r), 501, "{path}: {r}");
        assert!(message(&r).contains("not implemented"), "{r}");
    }
    // A client that sends a few MiB before it reads (a container config
    // with a large payload, a build context) gets the answer, not a
    // broken pipe; the daemon keeps serving after each.
    for (path, code) in [
        ("/v1.47/containers/create", 501),
        ("/build?t=x", 501),
        ("/v1.47/no/such/route", 404),
    ] {
        let (sent, r) = post_body(h, path, 4 << 20);
        assert!(sent, "{path}: the body could not be sent whole: {r}");
        assert_eq!(status(&r), code, "{path}: {r}");
        assert!(!message(&r).is_empty(), "{path}: {r}");
        assert_eq!(status(&get(h, "GET", "/_ping")), 200);
    }
    // A body past the bound is not read: the answer comes at once and
    // the connection closes (the client sent only its head here).
    let r = raw(
        h,
        b"POST /build HTTP/1.1\r\nHost: d\r\nContent-Length: 1073741824\r\n\r\n",
    );
    assert_eq!(status(&r), 501, "{r}");
    assert!(r.to_lowercase().contains("connection: close"), "{r}");
}

/// go-units' `HumanSizeWithPrecision`, which the docker CLI prints sizes
/// with: decimal units, `precision` significant digits (`%.*g`).
fn human_size(size: u64, precision: usize) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let (mut v, mut i) = (size as f64, 0);
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let digits = if v == 0.0 {
        1
    } else {
        v.abs().log10().floor() as i64 + 1
    };
    let decimals = (precision as i64 - digits).max(0) as usize;
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s}{}", units[i])
}

#[test]
fn system_df_image_ls_digests_and_inspect_templates_match_the_store() {
    if !(peers() && require("docker")) {
        return;
    }
    use gantry_tests::image::{sha256, Image, Layer};
    use serde_json::json;
    let reg = Registry::start();
    // Two images on one base layer; a third name for the first.
    let base = Layer::new().file("base", 0o644, &[b'b'; 3000]).tar();
    let a_top = Layer::new().file("a", 0o644, &[b'a'; 1500]).tar();
    let b_top = Layer::new().file("b", 0o644, &[b'c'; 700]).tar();
    let (_pa, a_manifest, _) = publish(&reg, "test/a", "v1", &Image::new(vec![base.clone(), a_top.clone()]));
    let (_pb, b_manifest, _) = publish(&reg, "test/b", "v1", &Image::new(vec![base.clone(), b_top.clone()]));
    let g = Gantry::new();
    let d = g.daemon();
    let (a, b) = (format!("{}/test/a:v1", reg.addr()), format!("{}/test/b:v1", reg.addr()));
    ok(&g, &d.addr, &["pull", "-q", &a]);
    ok(&g, &d.addr, &["pull", "-q", &b]);
    ok(&g, &d.addr, &["tag", &a, "again/a:v2"]);

    // Each layer's size as the store records it, by chain ID.
    let size_of = |chain: &str| -> u64 {
        std::fs::read_to_string(g.image_dir(&format!("layerdb/sha256/{}/size", &chain[7..])))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let chain = |parent: &str, diff: &str| sha256(format!("{parent} {diff}").as_bytes());
    let base_id = sha256(&base);
    let (a_id, b_id) = (chain(&base_id, &sha256(&a_top)), chain(&base_id, &sha256(&b_top)));
    let (base_size, a_size, b_size) = (size_of(&base_id), size_of(&a_id), size_of(&b_id));
    assert!(base_size >= 3000 && a_size >= 1500 && b_size >= 700);

    // GET /system/df: dockerd's shape; SharedSize is the base layer (used
    // by both), LayersSize each layer once.
    let r = get(&d.addr, "GET", "/v1.47/system/df");
    assert_eq!(status(&r), 200, "{r}");
    let df = json_body(&r);
    assert_eq!(df["LayersSize"], json!(base_size + a_size + b_size), "{df}");
    for key in ["Containers", "Volumes", "BuildCache"] {
        assert_eq!(df[key], json!([]), "{key}: {df}");
    }
    let images = df["Images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{df}");
    let row = |tag: &str| {
        images
            .iter()
            .find(|i| i["RepoTags"].as_array().unwrap().iter().any(|t| t == tag))
            .unwrap_or_else(|| panic!("{tag}: {df}"))
    };
    for (name, own) in [(&a, a_size), (&b, b_size)] {
        let i = row(name);
        assert_eq!(i["Size"], json!(base_size + own), "{i}");
        assert_eq!(i["SharedSize"], json!(base_size), "{i}");
        assert_eq!(i["Containers"], json!(0), "{i}");
        let ours: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", name])).unwrap();
        assert_eq!(i["Id"], ours[0]["Id"], "{i}");
        assert_eq!(i["ParentId"], json!(""), "{i}");
        assert!(i["Created"].as_i64().unwrap() > 0 && i["Labels"].is_null(), "{i}");
    }
    assert_eq!(row(&a)["RepoTags"], json!([a, "again/a:v2"]), "{df}");
    assert_eq!(
        row(&a)["RepoDigests"],
        json!([format!("{}/test/a@{}", reg.addr(), a_manifest.digest)])
    );
    // `type` asks for some parts only; a type dockerd does not know is a 400.
    let r = json_body(&get(&d.addr, "GET", "/system/df?type=volume"));
    assert_eq!((r["Images"].is_null(), &r["Volumes"]), (true, &json!([])), "{r}");
    assert_eq!(status(&get(&d.addr, "GET", "/system/df?type=colour")), 400);
    // `shared-size` on the image list counts the same way (-1 without).
    let listed = json_body(&get(&d.addr, "GET", "/images/json?shared-size=1"));
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["SharedSize"] == json!(base_size)),
        "{listed}"
    );
    let listed = json_body(&get(&d.addr, "GET", "/images/json"));
    assert!(
        listed.as_array().unwrap().iter().all(|i| i["SharedSize"] == json!(-1)),
        "{listed}"
    );

    // `docker system df`: the images row, as the CLI renders those numbers.
    let total = base_size + a_size + b_size;
    let out = ok(&g, &d.addr, &["system", "df"]);
    let images_row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("Images "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    let size = human_size(total, 4);
    assert_eq!(
        images_row,
        ["Images", "2", "0", size.as_str(), size.as_str(), "(100%)"],
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Containers", "0", "0", "0B", "0B"]),
        "{out}"
    );
    // `docker system df -v`: per image, its size, shared and unique sizes.
    let out = ok(&g, &d.addr, &["system", "df", "-v"]);
    for (repo, own) in [
        (format!("{}/test/a", reg.addr()), a_size),
        (format!("{}/test/b", reg.addr()), b_size),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{repo} ")))
            .unwrap_or_else(|| panic!("{repo}: {out}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let tail = &cols[cols.len() - 4..];
        assert_eq!(
            tail,
            [
                human_size(base_size + own, 3),
                human_size(base_size, 4),
                human_size(own, 4),
                "0".to_string()
            ],
            "{line}"
        );
    }

    // `docker image ls --digests`: the digest each name was pulled by.
    let out = ok(&g, &d.addr, &["image", "ls", "--digests"]);
    for (repo, m) in [("test/a", &a_manifest), ("test/b", &b_manifest)] {
        let repo = format!("{}/{repo}", reg.addr());
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{repo} ")))
            .unwrap_or_else(|| panic!("{repo}: {out}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[1..3], ["v1", m.digest.as_str()], "{out}");
    }

    // `docker image inspect --format`: what the store knows.
    let ours: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &a])).unwrap();
    let format = |template: &str| {
        ok(&g, &d.addr, &["image", "inspect", "--format", template, &a])
            .trim()
            .to_string()
    };
    assert_eq!(format("{{.Id}}"), ours[0]["Id"].as_str().unwrap());
    assert_eq!(format("{{.Os}}/{{.Architecture}}"), "linux/amd64");
    assert_eq!(
        format("{{json .RootFS.Layers}}"),
        json!([sha256(&base), sha256(&a_top)]).to_string()
    );
    assert_eq!(
        format("{{index .RepoDigests 0}}"),
        format!("{}/test/a@{}", reg.addr(), a_manifest.digest)
    );
    assert_eq!(format("{{.Config.Cmd}}"), "[/bin/sh]");
    assert_eq!(format("{{.Size}}"), (base_size + a_size).to_string());
}

/// dockerd (Debian's `docker.io`), with a socket, data and state of the
/// test's own and no networking of its own, for answers to compare with
/// gantry's; `None` (a skip that says why) without it or without root.
struct Dockerd {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    fn start() -> Option<Dockerd> {
        let installed = Command::new("sh")
            .args(["-c", "command -v dockerd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed || !gantry_tests::is_root() {
            eprintln!("skipped: comparing with dockerd needs dockerd (Debian's docker.io) and root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let child = Command::new("dockerd")
            .args([
                "--data-root",
                &p("root"),
                "--exec-root",
                &p("exec"),
                "--pidfile",
                &p("pid"),
            ])
            .args(["-H", &format!("unix://{}", sock.display())])
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--insecure-registry", "127.0.0.0/8"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("dockerd.log")).unwrap())
            .spawn()
            .unwrap();
        let addr = format!("unix://{}", sock.display());
        // Waits for it to answer (a bound, not a measure: a dockerd that
        // never comes up fails the test with its log).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !(sock.exists() && status(&get(&addr, "GET", "/_ping")) == 200) {
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(dir.path().join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Some(Dockerd { child, addr, _dir: dir })
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops the containerd it started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn gantry_answers_the_image_routes_as_dockerd_does() {
    if !(peers() && require("docker")) {
        return;
    }
    let Some(dockerd) = Dockerd::start() else { return };
    use gantry_tests::image::{Image, Layer, Layout};
    use serde_json::json;
    let reg = Registry::start();
    // (No symbolic link: a layer's size counts regular files only, where
    // dockerd adds each link's length.)
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/base", 0o644, &[b'b'; 3000])
        .tar();
    let a_top = Layer::new().file("a", 0o644, &[b'a'; 1500]).tar();
    let b_top = Layer::new().file("b", 0o644, &[b'c'; 700]).tar();
    let (_pa, _, _) = publish(&reg, "test/a", "v1", &Image::new(vec![base.clone(), a_top]));
    let (_pb, _, _) = publish(&reg, "test/b", "v1", &Image::new(vec![base, b_top]));
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (amd, _) = layout.image(&control_image());
    let mut arm_image = control_image();
    arm_image.arch = "arm64";
    let (arm, _) = layout.image(&arm_image);
    let entries = vec![
        index_entry(&amd, json!({"os": "linux", "architecture": "amd64"})),
        index_entry(&arm, json!({"os": "linux", "architecture": "arm64", "variant": "v8"})),
    ];
    let idx = layout.blob(
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries})
            .to_string()
            .as_bytes(),
        "application/vnd.oci.image.index.v1+json",
    );
    layout.tag("multi", &idx, None);
    reg.push(dir.path(), "multi", "test/multi:v1");

    let g = Gantry::new();
    let d = g.daemon();
    let both = |method: &str, path: &str| (get(&d.addr, method, path), get(&dockerd.addr, method, path));

    // /version: every field dockerd gives (it leaves a false
    // `Experimental` out), and the Engine component's details.
    let (ours, theirs) = both("GET", "/v1.41/version");
    let (ours, theirs) = (json_body(&ours), json_body(&theirs));
    for key in theirs.as_object().unwrap().keys() {
        assert!(ours.get(key).is_some(), "{key}: ours {ours}, dockerd's {theirs}");
    }
    for key in ["Os", "Arch", "KernelVersion"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let details = |v: &serde_json::Value| {
        let mut k: Vec<String> = v["Components"][0]["Details"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(details(&ours), details(&theirs));
    // An unknown path.
    let (ours, theirs) = both("GET", "/v1.41/nonsense");
    assert_eq!((status(&ours), json_body(&ours)), (status(&theirs), json_body(&theirs)));

    // /distribution: an index alike; a missing image the same status. (A
    // single OCI manifest's platform dockerd leaves out: it reads Docker
    // schema 2 configs only.)
    let multi = format!("/v1.41/distribution/{}/test/multi:v1/json", reg.addr());
    let (ours, theirs) = both("GET", &multi);
    assert_eq!(status(&theirs), 200, "{theirs}");
    assert_eq!(json_body(&ours), json_body(&theirs));
    let single = format!("/v1.41/distribution/{}/test/a:v1/json", reg.addr());
    let (ours, theirs) = both("GET", &single);
    assert_eq!(json_body(&ours)["Descriptor"], json_body(&theirs)["Descriptor"]);
    let missing = format!("/v1.41/distribution/{}/test/none:v1/json", reg.addr());
    let (ours, theirs) = both("GET", &missing);
    assert_eq!(status(&ours), status(&theirs), "ours {ours}\ndockerd's {theirs}");

    // The same two images pulled into both: system df, image ls
    // --digests and inspect templates say the same.
    let (a, b) = (format!("{}/test/a:v1", reg.addr()), format!("{}/test/b:v1", reg.addr()));
    for host in [&d.addr, &dockerd.addr] {
        ok(&g, host, &["pull", "-q", &a]);
        ok(&g, host, &["pull", "-q", &b]);
    }
    let (ours, theirs) = both("GET", "/v1.41/system/df");
    let (ours, theirs) = (json_body(&ours), json_body(&theirs));
    assert_eq!(
        ours["LayersSize"], theirs["LayersSize"],
        "ours {ours}\ndockerd's {theirs}"
    );
    let by_id = |v: &serde_json::Value| {
        let mut images: Vec<serde_json::Value> = v["Images"].as_array().unwrap().clone();
        images.sort_by_key(|i| i["Id"].as_str().unwrap().to_string());
        images
    };
    let (mine, dockers) = (by_id(&ours), by_id(&theirs));
    assert_eq!(mine.len(), dockers.len());
    for (m, t) in mine.iter().zip(&dockers) {
        for key in [
            "Id",
            "ParentId",
            "RepoTags",
            "RepoDigests",
            "Created",
            "Size",
            "SharedSize",
            "Labels",
            "Containers",
        ] {
            assert_eq!(m[key], t[key], "{key}: ours {m}\ndockerd's {t}");
        }
    }
    let cli = |host: &str, args: &[&str]| ok(&g, host, args);
    let row = |out: &str, name: &str| -> String {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name}: {out}"))
            .to_string()
    };
    let (ours, theirs) = (cli(&d.addr, &["system", "df"]), cli(&dockerd.addr, &["system", "df"]));
    assert_eq!(
        row(&ours, "Images "),
        row(&theirs, "Images "),
        "ours\n{ours}\ndockerd's\n{theirs}"
    );
    let (ours, theirs) = (
        cli(&d.addr, &["system", "df", "-v"]),
        cli(&dockerd.addr, &["system", "df", "-v"]),
    );
    for repo in [format!("{}/test/a ", reg.addr()), format!("{}/test/b ", reg.addr())] {
        assert_eq!(
            row(&ours, &repo),
            row(&theirs, &repo),
            "ours\n{ours}\ndockerd's\n{theirs}"
        );
    }
    let format = "{{.Repository}} {{.Tag}} {{.Digest}} {{.ID}} {{.Size}}";
    let ls = |host: &str| {
        let mut l: Vec<String> = cli(host, &["image", "ls", "--digests", "--format", format])
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    assert_eq!(ls(&d.addr), ls(&dockerd.addr));
    for template in [
        "{{.Id}}",
        "{{.Os}}/{{.Architecture}}",
        "{{json .RootFS}}",
        "{{index .RepoDigests 0}}",
        "{{.Config.Cmd}}",
        "{{.Size}}",
        "{{json .RepoTags}}",
    ] {
        let f = |host: &str| cli(host, &["image", "inspect", "--format", template, &a]);
        assert_eq!(f(&d.addr), f(&dockerd.addr), "{template}");
    }
}
