//! `gantry daemon`: the real `docker` CLI (28.x) talks to gantry over its
//! socket: version negotiation, pull with Docker's progress stream, images,
//! inspect, history, tag, rmi, save | load, push, image prune, and a clean
//! 501 for what it does not serve.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::registry::Registry;
use gantry_tests::require;
use std::process::{Command, Output};

fn docker(g: &Gantry, host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .env("DOCKER_HOST", host)
        // Never the developer's config or credentials.
        .env("DOCKER_CONFIG", g.scratch().join("docker-config"))
        .output()
        .unwrap()
}

fn ok(g: &Gantry, host: &str, args: &[&str]) -> String {
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
