//! Disk quotas (`max_store_gib`, and `[[tenant]] max_store_gib`): a pull,
//! load, import or push to `gantry serve` that would take the store past
//! its quota is refused in one line before it fills the disk — by the
//! declared sizes when they already say so, else as the bytes arrive — and
//! leaves the store as it was; another tenant is unaffected.

use crate::{assert_refused, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::require;

/// One layer of `mib` MiB that does not compress, its bytes drawn from `seed`.
fn incompressible(mib: usize, seed: u64) -> Image {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let data: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Image::new(vec![Layer::new()
        .dir("data", 0o755)
        .file("data/blob", 0o644, &data)
        .tar()])
}

/// A store whose quota is `mib` MiB (its driver the tests' own).
fn store_with_quota(mib: u64) -> Gantry {
    let g = Gantry::new().with_config(&format!(
        "max_store_gib = {}\n[driver]\ntype = \"{}\"\n",
        mib as f64 / 1024.0,
        Gantry::test_driver()
    ));
    g.ok(&["images"]);
    g
}

/// `gantry load` of `archive` from standard input: refused in one line
/// saying `expect`, the store as it was.
fn load_refused(g: &Gantry, archive: &std::path::Path, expect: &str) {
    let before = g.store_listing();
    let r = g.run_stdin(&["load"], archive);
    assert!(!r.out.status.success(), "{}", r.stdout());
    assert!(r.stderr().contains(expect), "{}", r.stderr());
    assert_eq!(r.stderr().trim().lines().count(), 1, "{}", r.stderr());
    assert_eq!(g.store_listing(), before);
}

#[test]
fn a_store_refuses_what_would_pass_its_quota_before_the_disk_fills() {
    if !peers() {
        return;
    }
    let reg = Registry::start_logged();
    let (_published, _, layers) = publish(&reg, "test/big", "v1", &incompressible(24, 1));
    let big = format!("{}/test/big:v1", reg.addr());
    let blob = &layers[0].digest;
    // Each store holds a small image first (its driver's home made).
    publish(&reg, "test/control", "v1", &crate::control_image());
    let control = format!("{}/test/control:v1", reg.addr());

    // 16 MiB: the manifest declares a 24 MiB blob, refused before it is asked for.
    let small = store_with_quota(16);
    small.ok(&["pull", &control]);
    let line = assert_refused(
        &small,
        &["pull", &big],
        "the store's quota of 16.0 MiB would be exceeded",
    );
    assert!(
        line.contains(" in use, 25.") && line.ends_with(" MiB more needed"),
        "{line}"
    );
    let fetch = format!("\"GET /v2/test/big/blobs/{blob} ");
    assert!(!reg.log().contains(&fetch), "the blob was fetched: {}", reg.log());

    // 40 MiB: the blob fits, its 24 MiB unpacked beside it do not; refused
    // as they arrive.
    let mid = store_with_quota(40);
    mid.ok(&["pull", &control]);
    assert_refused(&mid, &["pull", &big], "the store's quota of 40.0 MiB would be exceeded");
    mid.fsck_clean();

    // 64 MiB: it fits, and `system df` shows the store against its quota.
    let roomy = store_with_quota(64);
    roomy.ok(&["pull", &big]);
    let df = roomy.ok(&["system", "df"]);
    let store_line = df.lines().find(|l| l.starts_with("Store")).unwrap();
    assert!(store_line.contains("64MiB") || store_line.contains("67.1MB"), "{df}");
    let json: serde_json::Value = serde_json::from_str(&roomy.ok(&["system", "df", "--format", "json"])).unwrap();
    assert_eq!(json["Quota"], 64u64 << 20, "{json}");
    assert_eq!(json["Images"], 1, "{json}");
    roomy.ok(&["pull", &control]);
    let used = json["StoreSize"].as_u64().unwrap();
    assert!((48 << 20..64 << 20).contains(&used), "{json}");
    assert!(json["LayersSize"].as_u64().unwrap() >= 24 << 20, "{json}");
    // Past it now: the next pull of anything new is refused.
    let (_p2, _, _) = publish(&reg, "test/big2", "v1", &incompressible(24, 2));
    assert_refused(
        &roomy,
        &["pull", &format!("{}/test/big2:v1", reg.addr())],
        "the store's quota of 64.0 MiB would be exceeded",
    );

    // load and import are charged the same way.
    let archive = roomy.scratch().join("big.tar");
    roomy.ok(&["save", "-o", archive.to_str().unwrap(), &big]);
    assert_refused(
        &small,
        &["load", "-i", archive.to_str().unwrap()],
        "the store's quota of 16.0 MiB would be exceeded",
    );
    // From standard input, as it streams.
    load_refused(&small, &archive, "the store's quota of 16.0 MiB would be exceeded");
    // skopeo writes manifest.json last: the layer is spooled (24 MiB) before
    // it can be unpacked (24 more), and the spool is charged too.
    let skopeo_archive = roomy.scratch().join("skopeo.tar");
    let copied = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{big}"))
        .arg(format!("docker-archive:{}:test/big:v1", skopeo_archive.display()))
        .output()
        .unwrap();
    assert!(copied.status.success(), "{copied:?}");
    load_refused(&mid, &skopeo_archive, "the store's quota of 40.0 MiB would be exceeded");
    // From the file itself nothing is spooled: it fits.
    mid.ok(&["load", "-i", skopeo_archive.to_str().unwrap()]);
    let rootfs = roomy.scratch().join("rootfs.tar");
    roomy.ok(&["export", "-o", rootfs.to_str().unwrap(), &big]);
    assert_refused(
        &small,
        &["import", rootfs.to_str().unwrap(), "imported:v1"],
        "the store's quota of 16.0 MiB would be exceeded",
    );
    // A store without a quota takes it all.
    let free = Gantry::new();
    free.ok(&["load", "-i", archive.to_str().unwrap()]);
}

#[test]
fn gantry_serve_refuses_pushes_past_its_store_s_quota() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/big", "v1", &incompressible(24, 1));
    publish(&reg, "test/small", "v1", &crate::control_image());
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/big:v1", reg.addr())]);
    g.ok(&["pull", &format!("{}/test/small:v1", reg.addr())]);

    let server = store_with_quota(16);
    let srv = server.serve(&[]);
    let to = format!("{}/team/big:v1", srv.addr);
    g.ok(&["tag", &format!("{}/test/big:v1", reg.addr()), &to]);
    let err = g.fails(&["push", &to]);
    // (The transport says the registry's error as Docker does, in lower case.)
    assert!(
        err.to_lowercase()
            .contains("http 403: the store's quota of 16.0 mib would be exceeded"),
        "{err}"
    );
    // A chunked upload (no declared length) is refused as its bytes pass
    // the quota, and its session goes with what it held.
    let start = crate::serve::raw(
        &srv.addr,
        format!(
            "POST /v2/team/chunked/blobs/uploads/ HTTP/1.1\r\nHost: {0}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    );
    assert_eq!(crate::serve::status(&start), 202, "{start}");
    let location = start
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .unwrap()
        .trim()
        .to_string();
    let mut request = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {0}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        srv.addr
    )
    .into_bytes();
    for _ in 0..20 {
        request.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        request.extend(std::iter::repeat_n(7u8, 1 << 20));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = crate::serve::raw(&srv.addr, &request);
    assert_eq!(crate::serve::status(&answer), 403, "{answer}");
    assert!(answer.contains("DENIED") && answer.contains("quota"), "{answer}");
    let sessions = std::fs::read_dir(server.root_path().join("registry/uploads"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(sessions, 0, "a refused upload's session was kept");
    // Nothing of it is served; a small image still fits.
    let answer = crate::serve::get(&srv.addr, "/v2/team/big/manifests/v1");
    assert_eq!(crate::serve::status(&answer), 404, "{answer}");
    let small = format!("{}/team/small:v1", srv.addr);
    g.ok(&["tag", &format!("{}/test/small:v1", reg.addr()), &small]);
    g.ok(&["push", &small]);
    Gantry::new().ok(&["pull", &small]);
}

#[test]
fn a_tenant_s_quota_refuses_its_pulls_and_leaves_other_tenants_alone() {
    if !(peers() && require("docker")) {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/big", "v1", &incompressible(24, 1));
    let big = format!("{}/test/big:v1", reg.addr());
    let g = Gantry::new();
    let dir = g.scratch().join("tenants");
    std::fs::create_dir_all(&dir).unwrap();
    let driver = format!("[driver]\ntype = \"{}\"\n", Gantry::test_driver());
    // Tenant a's own config would allow a gigabyte; the tenants file says 16 MiB.
    std::fs::write(dir.join("a.toml"), format!("max_store_gib = 1\n{driver}")).unwrap();
    std::fs::write(dir.join("b.toml"), &driver).unwrap();
    let mut file = String::new();
    for (name, quota) in [("a", "max_store_gib = 0.015625\n"), ("b", "")] {
        file.push_str(&format!(
            "[[tenant]]\nname = \"{name}\"\nsocket = \"{name}.sock\"\nroot = \"{name}-root\"\nconfig = \"{name}.toml\"\n{quota}\n"
        ));
    }
    std::fs::write(dir.join("tenants.toml"), file).unwrap();
    let mut daemon = crate::daemon::spawn_tenants(&g, &dir.join("tenants.toml"), 2);
    let host = |name: &str| format!("unix://{}", dir.join(format!("{name}.sock")).display());
    let out = crate::daemon::docker_command(&g, &host("a"))
        .args(["pull", &big])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the store's quota of 16.0 MiB would be exceeded"),
        "{stderr}"
    );
    let df = crate::daemon::docker_command(&g, &host("a"))
        .args(["image", "ls", "-q"])
        .output()
        .unwrap();
    assert!(df.stdout.is_empty(), "{df:?}");
    crate::daemon::ok(&g, &host("b"), &["pull", &big]);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
}
