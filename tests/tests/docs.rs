//! The reference in `docs/` keeps up with the code: a flag added to a
//! command, or a key added to a config file's structs, without a word in
//! the docs fails here.
//!
//! What it scans:
//! - flags: the built binary's `--help`, and `gantry SUB... --help` of every
//!   subcommand the help lists, recursively; each `--long` name on an
//!   option line (`--help` and `--version` aside). A flag is documented when
//!   some `docs/*.md` has `--name` not followed by more of a name (so
//!   `--max-uploads` is not found inside `--max-uploads-per-repo`).
//! - config keys: every struct in the workspace's crates that derives
//!   serde's `Deserialize` with `deny_unknown_fields` — the mark of a file
//!   a person writes (the config, its `[registries."host"]` tables, the
//!   daemon's tenants file), where an unknown key is an error. Each field's
//!   key honours `#[serde(rename = "…")]` and the struct's `rename_all`;
//!   `flatten`ed and skipped fields have no key of their own. A key is
//!   documented when some `docs/*.md` shows it as code: `` `key` ``,
//!   `` `key = … ` ``, a `[key]` or `[key."…"]` table, or a TOML line
//!   `key = …`.
//!
//! The scan reads Rust source as lines, not as syntax: a struct's
//! attributes and fields are expected one a line, as rustfmt writes them.

use gantry_tests::gantry::binary;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every `docs/*.md`, one text.
fn docs() -> String {
    let dir = workspace_root().join("docs");
    let mut pages: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "no pages in docs/");
    pages
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `gantry ARGS... --help`, which must succeed.
fn help(path: &[String]) -> String {
    let out = Command::new(binary()).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "gantry {} --help failed", path.join(" "));
    String::from_utf8(out.stdout).unwrap()
}

/// The lines of one section of clap's help (`Commands:`, `Options:`), up
/// to the next blank line.
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| l.trim_end() != title)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

/// The long flags of one help text: on each line that starts with a flag
/// (`-q, --quiet`, `--format <FORMAT>`), the first `--name`; a description
/// that mentions another flag is on a line of its own, or after it.
fn long_flags(help: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for line in section(help, "Options:") {
        for token in line.split_whitespace() {
            let token = token.trim_end_matches(',');
            if let Some(name) = token.strip_prefix("--") {
                let end = name.find(['<', '=', '[']).unwrap_or(name.len());
                flags.push(name[..end].to_string());
                break;
            } else if !token.starts_with('-') {
                break;
            }
        }
    }
    flags
}

/// The subcommands one help text lists (`help` aside): a name indented by
/// two spaces in the `Commands:` section; wrapped descriptions are indented
/// further.
fn subcommands(help: &str) -> Vec<String> {
    section(help, "Commands:")
        .into_iter()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect()
}

/// Every long flag of every command, with the command that takes it.
fn all_flags() -> BTreeSet<(String, String)> {
    let mut flags = BTreeSet::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut commands = 0;
    while let Some(path) = todo.pop() {
        commands += 1;
        let text = help(&path);
        for f in long_flags(&text) {
            if f != "help" && f != "version" {
                flags.insert((format!("gantry {}", path.join(" ")).trim_end().to_string(), f));
            }
        }
        for sub in subcommands(&text) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    // The scan itself must have worked: gantry, its commands and plugin's.
    assert!(commands > 15, "only {commands} commands found in --help");
    flags
}

/// Whether `docs` names `--flag` as a whole flag.
fn names_flag(docs: &str, flag: &str) -> bool {
    let needle = format!("--{flag}");
    docs.match_indices(&needle).any(|(i, _)| {
        let next = docs[i + needle.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

#[test]
fn every_cli_flag_is_in_the_docs() {
    let docs = docs();
    let missing: Vec<_> = all_flags()
        .into_iter()
        .filter(|(_, f)| !names_flag(&docs, f))
        .map(|(cmd, f)| format!("{cmd} --{f}"))
        .collect();
    assert!(missing.is_empty(), "flags no page of docs/ names: {missing:?}");
}

/// Every `.rs` file of the workspace's crates: each top-level directory
/// but `target`, `tests` (fixtures, not config) and `examples`.
fn sources() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = workspace_root();
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && !name.starts_with('.') && !["target", "tests", "examples"].contains(&name.as_str()) {
            walk(&p, &mut out);
        }
    }
    out.sort();
    out
}

/// `value` of `key = "value"` inside an attribute line.
fn attr_value(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!("{key} = \""))? + key.len() + 4;
    Some(line[at..].split('"').next()?.to_string())
}

/// A field name spelled as serde's `rename_all` says.
fn rename_all(field: &str, rule: &str) -> String {
    let words: Vec<&str> = field.split('_').collect();
    let cap = |w: &str| {
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect::<String>())
            .unwrap_or_default()
    };
    match rule {
        "snake_case" => field.to_string(),
        "lowercase" => field.replace('_', ""),
        "UPPERCASE" => field.replace('_', "").to_uppercase(),
        "SCREAMING_SNAKE_CASE" => field.to_uppercase(),
        "kebab-case" => field.replace('_', "-"),
        "SCREAMING-KEBAB-CASE" => field.replace('_', "-").to_uppercase(),
        "PascalCase" => words.iter().map(|w| cap(w)).collect(),
        "camelCase" => {
            let pascal: String = words.iter().map(|w| cap(w)).collect();
            let mut c = pascal.chars();
            c.next()
                .map(|f| f.to_lowercase().chain(c).collect())
                .unwrap_or_default()
        }
        other => panic!("rename_all = {other:?}: teach this test that rule"),
    }
}

/// The keys of the config structs in one source file, each with its
/// struct's name.
fn config_keys(text: &str) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut attrs: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        i += 1;
        if line.starts_with("#[") || line.starts_with("///") {
            attrs.push(line);
            continue;
        }
        let is_struct = line.contains("struct ") && line.ends_with('{');
        let derives = attrs
            .iter()
            .any(|a| a.starts_with("#[derive(") && a.contains("Deserialize"));
        let denies = attrs
            .iter()
            .any(|a| a.starts_with("#[serde(") && a.contains("deny_unknown_fields"));
        let rule = attrs.iter().find_map(|a| attr_value(a, "rename_all"));
        attrs.clear();
        if !(is_struct && derives && denies) {
            continue;
        }
        let name = line
            .split("struct ")
            .nth(1)
            .unwrap()
            .split([' ', '<', '{'])
            .next()
            .unwrap();
        let mut field_attrs: Vec<&str> = Vec::new();
        while i < lines.len() {
            let l = lines[i].trim();
            i += 1;
            if l.starts_with('}') {
                break;
            }
            if l.starts_with("#[") {
                field_attrs.push(l);
                continue;
            }
            if l.starts_with("//") || l.is_empty() {
                continue;
            }
            let decl = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            let Some((field, _)) = decl.split_once(':') else {
                panic!("{name}: cannot read the field line {l:?}");
            };
            let serde: Vec<_> = field_attrs.drain(..).filter(|a| a.starts_with("#[serde(")).collect();
            if serde.iter().any(|a| {
                a.contains("flatten") || a.contains("skip)") || a.contains("skip,") || a.contains("skip_deserializing")
            }) {
                continue;
            }
            let key = serde
                .iter()
                .find_map(|a| attr_value(a, "rename"))
                .unwrap_or_else(|| match &rule {
                    Some(r) => rename_all(field.trim(), r),
                    None => field.trim().to_string(),
                });
            keys.push((name.to_string(), key));
        }
    }
    keys
}

/// Whether `docs` shows `key` as code: `` `key` ``, `` `key = ``, `[key]`,
/// `[key.`, `[[key]]`, or a line `key = `.
fn names_key(docs: &str, key: &str) -> bool {
    docs.match_indices(key).any(|(i, _)| {
        let before = docs[..i].chars().next_back();
        let after = &docs[i + key.len()..];
        let opened = matches!(before, None | Some('`') | Some('[') | Some('\n'));
        let closed =
            after.starts_with('`') || after.starts_with(']') || after.starts_with('.') || after.starts_with(" =");
        opened && closed
    })
}

#[test]
fn every_config_key_is_in_the_docs() {
    let root = workspace_root();
    let docs = docs();
    let mut keys = BTreeSet::new();
    for file in sources() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (name, key) in config_keys(&text) {
            let rel = file.strip_prefix(&root).unwrap().display().to_string();
            keys.insert((key, format!("{rel}: {name}")));
        }
    }
    // The scan itself must have worked: a key of the config, of a
    // registry's table, of the sandbox limits and of the tenants file.
    for probe in ["max_concurrent_downloads", "redirect_hosts", "wall_seconds", "socket"] {
        assert!(
            keys.iter().any(|(k, _)| k == probe),
            "the scan found no config key {probe:?}: {keys:?}"
        );
    }
    let missing: Vec<_> = keys
        .iter()
        .filter(|(k, _)| !names_key(&docs, k))
        .map(|(k, from)| format!("{k} ({from})"))
        .collect();
    assert!(missing.is_empty(), "config keys no page of docs/ names: {missing:?}");
}

/// The README is the way in: it names the two commands and links every
/// page of `docs/`, and the pages name only the contract version the WIT
/// states (the tidy test checks README.md and ARCHITECTURE.md for that).
#[test]
fn the_readme_leads_to_every_page() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for command in ["make demo", "make test"] {
        assert!(readme.contains(command), "README.md must name `{command}`");
    }
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            assert!(
                readme.contains(&format!("(docs/{name})")),
                "README.md must link docs/{name}"
            );
        }
    }
    let wit = std::fs::read_to_string(root.join("wit/types.wit")).unwrap();
    let version = wit
        .lines()
        .find_map(|l| l.trim().strip_prefix("package gantry:plugin@"))
        .and_then(|v| v.strip_suffix(';'))
        .expect("a package line in wit/types.wit");
    let docs = docs();
    for (i, _) in docs.match_indices("gantry:plugin@") {
        let rest = &docs[i + "gantry:plugin@".len()..];
        let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        assert_eq!(v.trim_end_matches('.'), version, "docs/ names gantry:plugin@{v}");
    }
}

/// The README's config section is `gantry config show` with no file: the
/// code's defaults and the README come from one source.
#[test]
fn the_readme_shows_every_config_key_at_its_default() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split_once("## The config\n")
        .expect("README.md has a `## The config` section")
        .1;
    let block = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .expect("the config section holds a ```toml block")
        .0;
    let out = Command::new(binary())
        .args(["config", "show"])
        .env_remove("GANTRY_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "gantry config show: {out:?}");
    let shown = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        block, shown,
        "README.md's config block differs from `gantry config show`: paste its output"
    );
}
