//! `gantry serve` as a registry by the OCI distribution spec: the OCI
//! conformance suite (third_party/oci-conformance) finds nothing failed, and
//! an OCI 1.1 client (oras) pushes an artifact about an image and finds it
//! through the referrers API.

use crate::peers;
use gantry_tests::gantry::Gantry;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The suite `make deps` builds, or `None` (a skip that says why; a failure
/// under `GANTRY_REQUIRE_PEERS`).
pub(crate) fn suite() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oci-conformance.test");
    if bin.is_file() {
        return Some(bin);
    }
    if std::env::var_os("GANTRY_REQUIRE_PEERS").is_some() {
        panic!(
            "{} is required (GANTRY_REQUIRE_PEERS is set): run make deps",
            bin.display()
        );
    }
    eprintln!("skipped: the OCI conformance suite is not built (make deps)");
    None
}

/// Runs the suite (its `version`'s set of checks) against `url`; its
/// summary line `N passed, N failed, N skipped`, and the whole output.
pub(crate) fn run_suite(bin: &Path, url: &str, version: &str, out: &Path) -> ((u32, u32, u32), String) {
    let run = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../third_party/oci-conformance/run.sh"))
        .arg(url)
        .env("OCI_CONFORMANCE_BIN", bin)
        .env("OCI_CONFORMANCE_OUT", out)
        .env("OCI_VERSION", version)
        .env("TMPDIR", out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    let line = text
        .lines()
        .find(|l| l.contains(" passed, ") && l.contains(" failed, "))
        .unwrap_or_else(|| panic!("no summary from the suite: {text}"));
    let n: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    ((n[0], n[1], n[2]), text)
}

/// Every check of the OCI 1.1 suite passes, and of its `dev` set too
/// (upload cancel, digest headers, `?tag=` on a push by digest): sha512
/// blobs and manifests, the referrers API and `subject`, artifacts,
/// non-distributable layers, chunked and out-of-order uploads, ranges,
/// mounts with and without `from`, deletes.
#[test]
fn the_oci_conformance_suite_passes() {
    let Some(bin) = suite() else { return };
    let g = Gantry::new();
    let srv = g.serve(&[]);
    let out = g.scratch().join("conformance");
    std::fs::create_dir_all(&out).unwrap();
    let ((passed, failed, skipped), text) = run_suite(&bin, &format!("http://{}", srv.addr), "1.1", &out);
    assert_eq!(failed, 0, "{text}");
    assert!(passed > 800, "{text}");
    // The only ones left out are the two the 1.1 set disables (tag parameters).
    assert!(skipped <= 2, "{text}");
    let ((passed, failed, skipped), text) = run_suite(&bin, &format!("http://{}", srv.addr), "dev", &out);
    assert_eq!((failed, skipped), (0, 0), "{text}");
    assert!(passed > 900, "{text}");
}

/// The oras client pushes an artifact, then a second one whose `subject`
/// is the first (a signature, an SBOM); the referrers API lists it with
/// its artifact type, filters by type, and forgets it once deleted.
#[test]
fn oras_pushes_an_artifact_with_a_subject_and_finds_it_by_referrers() {
    if !peers() {
        return;
    }
    let Some(python) = gantry_tests::oras_python() else {
        return;
    };
    let g = Gantry::new();
    let srv = g.serve(&[]);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("app.txt"), b"the application\n").unwrap();
    std::fs::write(work.path().join("sbom.json"), b"{\"packages\":[]}\n").unwrap();
    let script = r#"
import json, sys, oras.client, oras.oci
host = sys.argv[1]
c = oras.client.OrasClient(hostname=host, insecure=True)
c.push(files=["app.txt"], target=f"{host}/test/app:v1")
head = c.do_request(f"http://{host}/v2/test/app/manifests/v1", "HEAD",
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
subject = oras.oci.Subject(mediaType="application/vnd.oci.image.manifest.v1+json",
                           digest=head.headers["Docker-Content-Digest"],
                           size=int(head.headers["Content-Length"]))
c.push(files=["sbom.json"], target=f"{host}/test/app:sbom", subject=subject,
       manifest_config="config.json:application/vnd.example.sbom.v1+json")
def referrers(query=""):
    r = c.do_request(f"http://{host}/v2/test/app/referrers/{subject.digest}{query}", "GET")
    return {"status": r.status_code, "type": r.headers.get("Content-Type"),
            "filtered": r.headers.get("OCI-Filters-Applied"), "index": r.json()}
print(json.dumps({"subject": subject.digest, "all": referrers(),
                  "sbom": referrers("?artifactType=application/vnd.example.sbom.v1%2Bjson"),
                  "other": referrers("?artifactType=application/vnd.example.other")}))
"#;
    std::fs::write(work.path().join("config.json"), b"{}").unwrap();
    let out = Command::new(&python)
        .current_dir(work.path())
        .args(["-c", script, &srv.addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "oras: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = &v["all"];
    assert_eq!(all["status"], 200, "{v}");
    assert_eq!(all["type"], "application/vnd.oci.image.index.v1+json", "{v}");
    assert_eq!(all["filtered"], serde_json::Value::Null, "{v}");
    let listed = all["index"]["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["artifactType"], "application/vnd.example.sbom.v1+json", "{v}");
    assert_eq!(
        listed[0]["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{v}"
    );
    assert_eq!(v["sbom"]["filtered"], "artifactType", "{v}");
    assert_eq!(v["sbom"]["index"]["manifests"], all["index"]["manifests"], "{v}");
    assert_eq!(v["other"]["index"]["manifests"], serde_json::json!([]), "{v}");

    // The referrer, by digest, as any client fetches it; then deleted.
    let referrer = listed[0]["digest"].as_str().unwrap();
    let got = crate::serve::get(&srv.addr, &format!("/v2/test/app/manifests/{referrer}"));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.contains(v["subject"].as_str().unwrap()),
        "the referrer names its subject: {got}"
    );
    let deleted = crate::serve::raw(
        &srv.addr,
        format!(
            "DELETE /v2/test/app/manifests/{referrer} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            srv.addr
        )
        .as_bytes(),
    );
    assert!(deleted.starts_with("HTTP/1.1 202"), "{deleted}");
    let after = crate::serve::get(
        &srv.addr,
        &format!("/v2/test/app/referrers/{}", v["subject"].as_str().unwrap()),
    );
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert!(after.contains("\"manifests\":[]"), "{after}");
}

/// One `PUT` of `body` as `content_type`: the whole answer.
fn put(addr: &str, path: &str, content_type: &str, body: &[u8]) -> String {
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    crate::serve::raw(addr, &req)
}

/// Many referrers: the listing comes in pages of about a megabyte linked
/// by `Link`, every referrer once; a referrer whose annotations would make
/// its record over 16 KiB is listed without them.
#[test]
fn referrers_come_in_pages_and_big_annotations_are_left_out() {
    let g = Gantry::new();
    let srv = g.serve(&[]);
    let empty = b"{}";
    let empty_digest = gantry_tests::image::sha256(empty);
    let r = crate::serve::raw(
        &srv.addr,
        &[
            format!(
                "POST /v2/art/blobs/uploads/?digest={empty_digest} HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
                srv.addr
            )
            .into_bytes(),
            empty.to_vec(),
        ]
        .concat(),
    );
    assert_eq!(crate::serve::status(&r), 201, "{r}");
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let index_type = "application/vnd.oci.image.index.v1+json";
    let r = put(&srv.addr, "/v2/art/manifests/subject", index_type, index);
    assert_eq!(crate::serve::status(&r), 201, "{r}");
    let subject = gantry_tests::image::sha256(index);
    let referrer = |i: usize, note: usize| {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.note",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty_digest, "size": 2},
            "layers": [],
            "subject": {"mediaType": index_type, "digest": subject, "size": index.len()},
            "annotations": {"i": i.to_string(), "note": "n".repeat(note)},
        })
        .to_string()
    };
    let mut pushed = std::collections::BTreeSet::new();
    for i in 0..80 {
        let body = referrer(i, if i == 0 { 20_000 } else { 15_000 });
        let r = put(
            &srv.addr,
            &format!("/v2/art/manifests/n{i}"),
            "application/vnd.oci.image.manifest.v1+json",
            body.as_bytes(),
        );
        assert_eq!(crate::serve::status(&r), 201, "{r}");
        assert_eq!(crate::serve::header(&r, "OCI-Subject"), Some(subject.as_str()));
        pushed.insert(gantry_tests::image::sha256(body.as_bytes()));
    }
    let big = gantry_tests::image::sha256(referrer(0, 20_000).as_bytes());
    let mut listed = Vec::new();
    let mut next = Some(format!("/v2/art/referrers/{subject}"));
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = crate::serve::get(&srv.addr, &path);
        assert_eq!(crate::serve::status(&r), 200, "{r}");
        assert!(
            crate::serve::body(&r).len() < (1 << 20) + (64 << 10),
            "a page of {} bytes",
            r.len()
        );
        let doc: serde_json::Value = serde_json::from_str(crate::serve::body(&r)).unwrap();
        for m in doc["manifests"].as_array().unwrap() {
            let d = m["digest"].as_str().unwrap().to_string();
            assert_eq!(
                m["annotations"].is_null(),
                d == big,
                "{d}: {}",
                m["annotations"].is_null()
            );
            listed.push(d);
        }
        next =
            crate::serve::header(&r, "Link").map(|l| l.trim_start_matches('<').split('>').next().unwrap().to_string());
        pages += 1;
    }
    assert!(pages >= 2, "one page held everything");
    let unique: std::collections::BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(listed.len(), unique.len(), "a referrer listed twice");
    assert_eq!(unique, pushed);
}
