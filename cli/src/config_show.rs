//! `gantry config show`: the effective config as TOML, every key with the
//! value it takes (a file's, else the built-in default from
//! `Config::default()`). A key left unset prints as a comment saying what
//! that means, so the output names every key and loads back as it is.
//!
//! Rendered here rather than by `toml::to_string`: TOML has no null, and
//! the unset keys are half of what an operator asks `config show` about.

use crate::config::Config;
use serde_json::Value;
use std::fmt::Write as _;

/// What each key that may be left unset means then, by its dotted path.
const UNSET: &[(&str, &str)] = &[
    (
        "plugin_dir",
        "beside the binary (plugins/), then the cargo target directory",
    ),
    ("plugin_cache_dir", "<root>/plugins-cache"),
    (
        "auth_file",
        "the CLI: $DOCKER_CONFIG/config.json, else ~/.docker/config.json; the daemon: none",
    ),
    ("allowed_registries", "every registry"),
    ("max_store_gib", "no quota"),
    ("transport.path", "<plugin_dir>/gantry_transport_<type>.wasm"),
    ("transport.limits", "the [limits] table"),
    ("driver.path", "<plugin_dir>/gantry_driver_<type>.wasm"),
    ("driver.limits", "the [limits] table"),
    (
        "network.certs_dirs",
        "[\"/etc/docker/certs.d\", \"/etc/containers/certs.d\"]",
    ),
    ("network.https_proxy", "$HTTPS_PROXY"),
    ("network.http_proxy", "$HTTP_PROXY"),
    ("network.no_proxy", "$NO_PROXY"),
    ("serve.storage.endpoint", "none (needed with type = \"s3\")"),
    ("serve.storage.bucket", "none (needed with type = \"s3\")"),
    (
        "serve.storage.access_key",
        "$AWS_ACCESS_KEY_ID, else the shared credentials file",
    ),
    (
        "serve.storage.secret_key",
        "$AWS_SECRET_ACCESS_KEY, else the shared credentials file",
    ),
];

/// Keys whose value is a secret: shown only as set.
const SECRET: &[&str] = &["serve.storage.secret_key"];

/// Keys whose value is a URL that may carry a password.
const URLS: &[&str] = &["network.https_proxy", "network.http_proxy"];

/// `config` as TOML.
pub fn render(config: &Config) -> Result<String, String> {
    let value = serde_json::to_value(config).map_err(|e| e.to_string())?;
    let Value::Object(top) = value else {
        return Err("the config is not a table".into());
    };
    let mut out = String::new();
    table(&mut out, &mut Vec::new(), &top)?;
    Ok(out)
}

fn table(out: &mut String, path: &mut Vec<String>, map: &serde_json::Map<String, Value>) -> Result<(), String> {
    let dotted = |path: &[String], key: &str| {
        let mut p = path.to_vec();
        p.push(key.to_string());
        p.join(".")
    };
    // Values first, then the tables below this one, as TOML requires.
    for (key, v) in map {
        let here = dotted(path, key);
        match v {
            Value::Object(_) => {}
            Value::Null => {
                // A table in a table that is a map by name (registries) has
                // no fixed keys; every other unset key is in UNSET.
                let meaning = UNSET
                    .iter()
                    .find(|(k, _)| *k == here)
                    .map(|(_, m)| *m)
                    .ok_or_else(|| format!("{here}: no meaning written for it unset"))?;
                writeln!(out, "# {} = {meaning}", toml_key(key)).unwrap();
            }
            v if SECRET.contains(&here.as_str()) => {
                let _ = v;
                writeln!(out, "{} = \"(set, not shown)\"", toml_key(key)).unwrap();
            }
            Value::String(s) if URLS.contains(&here.as_str()) => {
                writeln!(
                    out,
                    "{} = {}",
                    toml_key(key),
                    toml_value(&Value::String(without_password(s)))?
                )
                .unwrap();
            }
            v => writeln!(out, "{} = {}", toml_key(key), toml_value(v)?).unwrap(),
        }
    }
    for (key, v) in map {
        if let Value::Object(inner) = v {
            path.push(key.clone());
            let header: Vec<String> = path.iter().map(|k| toml_key(k)).collect();
            writeln!(out, "\n[{}]", header.join(".")).unwrap();
            table(out, path, inner)?;
            path.pop();
        }
    }
    Ok(())
}

/// A key bare when TOML allows it, else quoted.
fn toml_key(k: &str) -> String {
    if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

fn toml_value(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            toml::Value::Float(f).to_string()
        }
        Value::Number(n) => n.to_string(),
        Value::String(s) => toml::Value::String(s.clone()).to_string(),
        Value::Array(items) => {
            let items: Result<Vec<String>, String> = items.iter().map(toml_value).collect();
            format!("[{}]", items?.join(", "))
        }
        Value::Object(map) => {
            let mut fields = Vec::new();
            for (k, v) in map {
                if !v.is_null() {
                    fields.push(format!("{} = {}", toml_key(k), toml_value(v)?));
                }
            }
            format!("{{ {} }}", fields.join(", "))
        }
        Value::Null => return Err("null inside an array".into()),
    })
}

/// A proxy URL without the password of its `user:password@`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:(not shown)@{host}{}", &rest[authority_end..])
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_it_prints_loads_back_as_the_same_config() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "auth_file = \"/etc/gantry/auth.json\"\n[registries.\"r.example:5000\"]\ninsecure = true\n[network]\nhttps_proxy = \"http://u:pw@proxy:3128\"\n[network.hosts]\n\"reg.internal\" = \"10.0.0.5\"\n[serve.storage]\ntype = \"s3\"\nsecret_key = \"hush\"\n[driver]\ntype = \"vfs\"\nlimits = { memory_mib = 99 }\n",
        )
        .unwrap();
        let c = Config::load(Some(t.path())).unwrap();
        let shown = render(&c).unwrap();
        assert!(!shown.contains("hush") && !shown.contains("pw@"), "{shown}");
        assert!(
            shown.contains("[registries.\"r.example:5000\"]\ninsecure = true\n"),
            "{shown}"
        );
        assert!(shown.contains("\"reg.internal\" = \"10.0.0.5\""), "{shown}");
        assert!(shown.contains("# plugin_dir = beside the binary"), "{shown}");
        let again: toml::Table = toml::from_str(&shown).unwrap();
        assert_eq!(again["driver"]["limits"]["memory_mib"].as_integer(), Some(99));
        assert_eq!(again["driver"]["limits"]["cpu_seconds"].as_float(), Some(10.0));
        // The built-in config names every key, unset ones in comments.
        let shown = render(&Config::default()).unwrap();
        let t2 = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t2.path(), &shown).unwrap();
        let back = Config::load(Some(t2.path())).unwrap();
        assert_eq!(render(&back).unwrap(), shown);
    }

    #[test]
    fn proxy_passwords_are_not_shown() {
        assert_eq!(
            without_password("http://u:pw@p:3128/x"),
            "http://u:(not shown)@p:3128/x"
        );
        assert_eq!(without_password("http://p:3128"), "http://p:3128");
    }
}
