//! images, inspect, history, tag, rmi and fsck on a pulled image.

use crate::{peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::registry::Registry;

#[test]
fn images_inspect_history_tag_rmi() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let g = Gantry::new();
    let name = format!("{}/test/rich:v1", reg.addr());
    g.ok(&["pull", &name]);

    let inspect: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    let i = &inspect[0];
    let id = i["Id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sha256:"));
    assert_eq!(i["RepoTags"], serde_json::json!([name]));
    assert!(i["RepoDigests"][0]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}/test/rich@sha256:", reg.addr())));
    assert_eq!(i["RootFS"]["Layers"].as_array().unwrap().len(), 3);
    assert_eq!(i["Os"], "linux");
    assert_eq!(i["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(i["Created"], "2023-11-14T22:13:20Z");
    assert!(i["Size"].as_u64().unwrap() > 300_000);

    let table = g.ok(&["images"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("REPOSITORY") && header.contains("IMAGE ID") && header.ends_with("SIZE"),
        "{table}"
    );
    assert!(
        table.contains(&format!("{}/test/rich", reg.addr())) && table.contains(&id[7..19]),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(g.ok(&["images", "--format", "json"]).lines().next().unwrap()).unwrap();
    assert_eq!(json["Tag"], "v1");
    assert_eq!(json["ID"], &id[7..19]);

    let history = g.ok(&["history", &name]);
    assert_eq!(history.lines().count(), 5, "{history}");
    assert!(history.lines().nth(1).unwrap().starts_with(&id[7..19]), "{history}");
    assert!(history.contains("<missing>"), "{history}");

    // Two names for one image: removing one only untags.
    g.ok(&["tag", &name, "other/name:latest"]);
    g.ok(&["tag", &id[7..19], "third:v2"]);
    let by_short = g.ok(&["inspect", "third:v2"]);
    assert!(by_short.contains(&id));
    let err = g.fails(&["rmi", &id]);
    assert!(err.contains("referenced in multiple repositories"), "{err}");
    let out = g.ok(&["rmi", "other/name"]);
    assert_eq!(out.trim(), "Untagged: other/name:latest");
    let out = g.ok(&["rmi", "third:v2"]);
    assert_eq!(out.trim(), "Untagged: third:v2");
    let layers = || g.layer_dirs().len();
    assert_eq!(layers(), 3);
    let out = g.ok(&["rmi", &name]);
    assert!(out.contains(&format!("Untagged: {name}")), "{out}");
    assert!(out.contains(&format!("Deleted: {id}")), "{out}");
    assert_eq!(
        out.matches("Deleted: ").count(),
        4,
        "the image and its three layers: {out}"
    );
    assert_eq!(layers(), 0);
    g.fsck_clean();
    let err = g.fails(&["inspect", &name]);
    assert!(err.contains("no such image"), "{err}");
}

#[test]
fn fsck_reports_a_damaged_store() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/rich:v1", reg.addr())]);
    g.fsck_clean();
    let layerdb = g.image_dir("layerdb/sha256");
    let first = std::fs::read_dir(&layerdb).unwrap().next().unwrap().unwrap().path();
    let cache = std::fs::read_to_string(first.join("cache-id")).unwrap();
    let data = match g.driver() {
        "overlay2" => g.root_path().join("overlay2").join(cache.trim()),
        _ => g.root_path().join("vfs/dir").join(cache.trim()),
    };
    std::fs::remove_dir_all(data).unwrap();
    std::fs::remove_file(first.join("tar-split.json.gz")).unwrap();
    let r = g.run(&["fsck"]);
    assert!(!r.out.status.success());
    assert!(
        r.stdout().contains("driver data") && r.stdout().contains("is missing"),
        "{}",
        r.stdout()
    );
    assert!(r.stdout().contains("reading the tar-split"), "{}", r.stdout());
}

/// A config of only what it changes runs every command; `config show`
/// prints it whole, with the defaults filled in, and refuses an unknown key.
#[test]
fn a_config_of_only_what_it_changes_runs_and_shows_whole() {
    let Some((reg, g)) = crate::control_store() else { return };
    let g = g.with_config(&format!("[registries.\"{}\"]\ninsecure = true\n", reg.addr()));
    g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    let shown = g.ok(&["config", "show"]);
    assert!(
        shown.contains(&format!(
            "[registries.\"{}\"]\ninsecure = true\nmirrors = []\n",
            reg.addr()
        )),
        "{shown}"
    );
    for default in [
        "max_concurrent_downloads = 3\n",
        "[transport]\n",
        "type = \"v2\"\n",
        "type = \"auto\"\n",
    ] {
        assert!(shown.contains(default), "{default:?} missing: {shown}");
    }
    let bad = Gantry::new().with_config("[registries.\"r\"]\ninsecure = true\nbogus = 1\n");
    let err = bad.fails(&["config", "show"]);
    assert!(err.contains("unknown field `bogus`"), "{err}");
}
