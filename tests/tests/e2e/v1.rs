//! The legacy v1 protocol: `gantry serve --from-store` answers the v1 read
//! API, and a gantry configured with `v1 = true` for a registry that does
//! not speak v2 pulls over it, request for request as a v1 client did.

use crate::{peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::proxy::{Faults, Proxy};
use gantry_tests::registry::Registry;

fn config(registry: &str, v1: bool) -> String {
    format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[registries.\"{registry}\"]\nv1 = {v1}\n",
        Gantry::test_driver()
    )
}

#[test]
fn gantry_pulls_over_v1_from_gantry_serve() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/app", "v1", &Image::new(rich_layers()));
    let server_store = Gantry::new();
    let v2_name = format!("{}/test/app:v1", reg.addr());
    server_store.ok(&["pull", &v2_name]);
    let srv = server_store.serve(&["--from-store"]);
    let port: u16 = srv.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    // In front of it, a proxy that hides v2: only v1 answers.
    let v1_only = Proxy::start(
        port,
        Faults {
            no_v2: true,
            ..Default::default()
        },
    );
    let name = format!("{}/test/app:v1", v1_only.addr());

    // v1 is off unless the config enables it.
    let off = Gantry::new().with_config(&config(&v1_only.addr(), false));
    off.ok(&["images"]);
    let before = off.store_listing();
    off.fails(&["pull", &name]);
    assert_eq!(off.store_listing(), before);

    let g = Gantry::new().with_config(&config(&v1_only.addr(), true));
    let out = g.ok(&["pull", &name]);
    assert!(out.contains("Pulling repository test/app"), "{out}");
    g.fsck_clean();
    // The same files as the v2 pull of the same image.
    // (Entry order follows the driver's directory order, so entries are
    // compared as a set.)
    let export = |g: &Gantry, n: &str, file: &str| {
        let p = g.scratch().join(file);
        g.ok(&["export", "-o", p.to_str().unwrap(), n]);
        let mut entries = Vec::new();
        for e in tar::Archive::new(std::fs::File::open(p).unwrap()).entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            entries.push((
                e.path_bytes().into_owned(),
                h.entry_type().as_byte(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                // A directory no layer names gets the time it was made.
                if h.entry_type().is_dir() { 0 } else { h.mtime().unwrap() },
                e.link_name_bytes().map(|l| l.into_owned()),
                data,
            ));
        }
        entries.sort();
        entries
    };
    let (a, b) = (export(&g, &name, "v1.tar"), export(&server_store, &v2_name, "v2.tar"));
    let diff: Vec<_> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| {
            (
                String::from_utf8_lossy(&x.0).into_owned(),
                x.1,
                x.2,
                x.4,
                String::from_utf8_lossy(&y.0).into_owned(),
                y.1,
                y.2,
                y.4,
            )
        })
        .take(5)
        .collect();
    assert!(
        a == b,
        "{} vs {} entries; first differences: {diff:?}",
        a.len(),
        b.len()
    );

    // Request for request, as seed 003 lists a v1 pull.
    let log = srv.log();
    let v1_lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split('"').nth(1))
        .filter(|r| r.starts_with("GET /v1/"))
        .collect();
    let shape: Vec<String> = v1_lines
        .iter()
        .map(|r| {
            let path = r.trim_start_matches("GET ");
            path.split('/')
                .map(|c| if c.len() == 64 { "ID" } else { c })
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let mut want = vec![
        "/v1/_ping".to_string(),
        "/v1/repositories/test/app/images".into(),
        "/v1/repositories/test/app/tags".into(),
        "/v1/images/ID/ancestry".into(),
    ];
    // Every JSON to check the chain first, then oldest first each image's
    // JSON (its X-Docker-Size) and layer.
    want.extend(std::iter::repeat_n("/v1/images/ID/json".to_string(), 3));
    for _ in 0..3 {
        want.push("/v1/images/ID/json".into());
        want.push("/v1/images/ID/layer".into());
    }
    assert_eq!(shape[shape.len() - want.len()..], want[..], "{log}");

    // A registry lying about a layer's size: refused, nothing changed.
    let liar = Proxy::start(
        port,
        Faults {
            no_v2: true,
            lie_docker_size: true,
            ..Default::default()
        },
    );
    let g3 = Gantry::new().with_config(&config(&liar.addr(), true));
    g3.ok(&["images"]);
    let before = g3.store_listing();
    let err = g3.fails(&["pull", &format!("{}/test/app:v1", liar.addr())]);
    assert!(err.contains("X-Docker-Size"), "{err}");
    assert_eq!(g3.store_listing(), before);

    // A tag the v1 registry does not have: one line, nothing changed.
    let before = g.store_listing();
    let err = g.fails(&["pull", &format!("{}/test/app:nope", v1_only.addr())]);
    assert!(err.contains("not found"), "{err}");
    assert_eq!(g.store_listing(), before);
}
