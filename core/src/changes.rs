//! Dockerfile instructions applied to an image's container config: what
//! `docker import --change` (and `docker commit --change`) accept — `CMD`,
//! `ENTRYPOINT`, `ENV`, `EXPOSE`, `HEALTHCHECK`, `LABEL`, `ONBUILD`,
//! `STOPSIGNAL`, `USER`, `VOLUME`, `WORKDIR` — with Docker's meanings: the
//! JSON (exec) form or the shell form wrapped in `/bin/sh -c`, `ENV` and
//! `LABEL` as `key=value` pairs with quotes (or the legacy `key value`),
//! `EXPOSE` ports as `port[/proto]` and ranges, a relative `WORKDIR`
//! against the one before, and an `ENTRYPOINT` clearing a `CMD` not set
//! before it. Variables (`$X`) are not substituted: there is no build.
//!
//! Written here rather than taken from a crate: the Dockerfile parsers on
//! crates.io parse whole files into syntax trees, and what is needed is
//! these eleven instructions' effect on one JSON object.

use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// The most ports one `EXPOSE` range may open.
const MAX_PORT_RANGE: u32 = 1 << 16;

fn invalid(m: impl Into<String>) -> Error {
    Error::Config(m.into())
}

/// Applies `changes` in order to `config` (a container config object,
/// Docker's `Cmd`, `Env`, … keys); an instruction that is not one of the
/// eleven, or that is malformed, fails the whole set.
pub fn apply(config: &mut Map<String, Value>, changes: &[String]) -> Result<()> {
    let mut cmd_set = false;
    for change in changes {
        let line = change.trim();
        let (word, rest) = match line.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((w, r)) => (w, r.trim()),
            None => (line, ""),
        };
        let keyword = word.to_ascii_uppercase();
        let known = [
            "CMD",
            "ENTRYPOINT",
            "ENV",
            "EXPOSE",
            "HEALTHCHECK",
            "LABEL",
            "ONBUILD",
            "STOPSIGNAL",
            "USER",
            "VOLUME",
            "WORKDIR",
        ];
        if !known.contains(&keyword.as_str()) {
            return Err(invalid(format!(
                "{} is not a valid change command",
                crate::text::escape_line(word)
            )));
        }
        if rest.is_empty() {
            return Err(invalid(format!("{keyword} requires at least one argument")));
        }
        apply_one(config, &keyword, rest, &mut cmd_set)?;
    }
    Ok(())
}

/// Applies one instruction, `keyword` (known, upper case) with its
/// arguments `rest`; `cmd_set` says an earlier `CMD` of the set ran.
/// Long on purpose: one short arm per instruction, the eleven read as one
/// table (as Docker's own dispatch does).
fn apply_one(config: &mut Map<String, Value>, keyword: &str, rest: &str, cmd_set: &mut bool) -> Result<()> {
    match keyword {
        "CMD" => {
            config.insert("Cmd".into(), json!(command(rest)));
            *cmd_set = true;
        }
        "ENTRYPOINT" => {
            config.insert("Entrypoint".into(), json!(command(rest)));
            if !*cmd_set {
                config.insert("Cmd".into(), Value::Null);
            }
        }
        "ENV" => {
            let env = config.entry("Env").or_insert_with(|| json!([]));
            if !env.is_array() {
                *env = json!([]);
            }
            let list = env.as_array_mut().expect("an array");
            for (k, v) in pairs(rest, "ENV")? {
                let prefix = format!("{k}=");
                list.retain(|e| !e.as_str().is_some_and(|s| s.starts_with(&prefix)));
                list.push(json!(format!("{k}={v}")));
            }
        }
        "LABEL" => {
            let labels = object(config, "Labels");
            for (k, v) in pairs(rest, "LABEL")? {
                labels.insert(k, json!(v));
            }
        }
        "EXPOSE" => {
            let mut ports = Vec::new();
            for spec in rest.split_ascii_whitespace() {
                ports.extend(expose(spec)?);
            }
            let exposed = object(config, "ExposedPorts");
            for p in ports {
                exposed.insert(p, json!({}));
            }
        }
        "VOLUME" => {
            let paths = match json_form(rest) {
                Some(v) => v,
                None => rest.split_ascii_whitespace().map(str::to_string).collect(),
            };
            if paths.is_empty() || paths.iter().any(|p| p.trim().is_empty()) {
                return Err(invalid("VOLUME specified can not be an empty string"));
            }
            let volumes = object(config, "Volumes");
            for p in paths {
                volumes.insert(p, json!({}));
            }
        }
        "USER" => {
            config.insert("User".into(), json!(rest));
        }
        "WORKDIR" => {
            let base = config
                .get("WorkingDir")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_string();
            config.insert("WorkingDir".into(), json!(workdir(&base, rest)));
        }
        "STOPSIGNAL" => {
            let ok = rest.parse::<u32>().is_ok_and(|n| (1..=64).contains(&n))
                || (rest.len() <= 16
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-')
                    && rest.bytes().next().is_some_and(|b| b.is_ascii_alphabetic()));
            if !ok {
                return Err(invalid(format!("invalid signal: {}", crate::text::escape_line(rest))));
            }
            config.insert("StopSignal".into(), json!(rest));
        }
        "ONBUILD" => {
            let first = rest.split_ascii_whitespace().next().unwrap_or("").to_ascii_uppercase();
            if matches!(first.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(invalid(format!("{first} isn't allowed as an ONBUILD trigger")));
            }
            let onbuild = config.entry("OnBuild").or_insert_with(|| json!([]));
            if !onbuild.is_array() {
                *onbuild = json!([]);
            }
            onbuild.as_array_mut().expect("an array").push(json!(rest));
        }
        "HEALTHCHECK" => {
            config.insert("Healthcheck".into(), healthcheck(rest)?);
        }
        _ => unreachable!("checked against the known instructions"),
    }
    Ok(())
}

fn object<'m>(config: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let v = config.entry(key).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("an object")
}

/// The JSON (exec) form: an array of strings, or `None` for the shell form.
fn json_form(rest: &str) -> Option<Vec<String>> {
    rest.starts_with('[')
        .then(|| serde_json::from_str::<Vec<String>>(rest).ok())
        .flatten()
}

/// `CMD`/`ENTRYPOINT`: the exec form as given, the shell form under
/// `/bin/sh -c`.
fn command(rest: &str) -> Vec<String> {
    json_form(rest).unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), rest.into()])
}

/// Splits on unquoted whitespace, removing quotes and backslash escapes as
/// Docker's word processing does.
fn words(s: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(n) => cur.push(n),
                        None => {
                            return Err(invalid(
                                "unexpected end of statement while looking for matching single-quote",
                            ))
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n @ ('"' | '\\' | '$')) => cur.push(n),
                            Some(n) => {
                                cur.push('\\');
                                cur.push(n);
                            }
                            None => {
                                return Err(invalid(
                                    "unexpected end of statement while looking for matching double-quote",
                                ))
                            }
                        },
                        Some(n) => cur.push(n),
                        None => {
                            return Err(invalid(
                                "unexpected end of statement while looking for matching double-quote",
                            ))
                        }
                    }
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// `ENV`/`LABEL` arguments: `k=v k2="v 2"`, or the legacy `key value…`.
fn pairs(rest: &str, keyword: &str) -> Result<Vec<(String, String)>> {
    let first = rest.split_ascii_whitespace().next().unwrap_or("");
    if !first.contains('=') {
        // Legacy form: one key, the rest of the line its value.
        let (k, v) = rest
            .split_once(|c: char| c.is_ascii_whitespace())
            .ok_or_else(|| invalid(format!("{keyword} must have two arguments")))?;
        return Ok(vec![(k.to_string(), v.trim().to_string())]);
    }
    words(rest)?
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(invalid(format!(
                "{keyword} names can not be blank: {}",
                crate::text::escape_line(&w)
            ))),
        })
        .collect()
}

/// One `EXPOSE` spec: `80`, `53/udp`, `8000-8002/tcp`.
fn expose(spec: &str) -> Result<Vec<String>> {
    let bad = || invalid(format!("invalid port: {}", crate::text::escape_line(spec)));
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(invalid(format!("invalid proto: {}", crate::text::escape_line(&proto))));
    }
    let port = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (1..=65535).contains(n))
            .ok_or_else(bad)
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if hi < lo || hi - lo >= MAX_PORT_RANGE {
        return Err(bad());
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// `WORKDIR`: an absolute path, or one relative to `base`, cleaned.
fn workdir(base: &str, dir: &str) -> String {
    let joined = if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("{base}/{dir}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A Go duration as `HEALTHCHECK` options (and Docker's `until` filters)
/// take it (`30s`, `1m30s`, `500ms`), in nanoseconds.
pub fn go_duration(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let n: i64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale: i64 = match &rest[..unit] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(scale)?)?;
        rest = &rest[unit..];
    }
    Some(total)
}

/// `HEALTHCHECK NONE`, or `HEALTHCHECK [--interval=…] [--timeout=…]
/// [--start-period=…] [--start-interval=…] [--retries=N] CMD …`.
fn healthcheck(rest: &str) -> Result<Value> {
    if rest.eq_ignore_ascii_case("none") {
        return Ok(json!({"Test": ["NONE"]}));
    }
    let mut hc = Map::new();
    let mut rest = rest;
    while let Some(opt) = rest.strip_prefix("--") {
        let (flag, after) = opt.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((opt, ""));
        rest = after.trim_start();
        let (name, value) = flag.split_once('=').ok_or_else(|| {
            invalid(format!(
                "HEALTHCHECK option --{} needs a value",
                crate::text::escape_line(flag)
            ))
        })?;
        let key = match name {
            "interval" => "Interval",
            "timeout" => "Timeout",
            "start-period" => "StartPeriod",
            "start-interval" => "StartInterval",
            "retries" => {
                let n: i64 = value.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    invalid(format!(
                        "invalid HEALTHCHECK retries: {}",
                        crate::text::escape_line(value)
                    ))
                })?;
                hc.insert("Retries".into(), json!(n));
                continue;
            }
            other => {
                return Err(invalid(format!(
                    "unknown HEALTHCHECK option --{}",
                    crate::text::escape_line(other)
                )))
            }
        };
        let ns = go_duration(value).ok_or_else(|| {
            invalid(format!(
                "invalid HEALTHCHECK duration: {}",
                crate::text::escape_line(value)
            ))
        })?;
        hc.insert(key.into(), json!(ns));
    }
    let (word, cmd) = rest.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((rest, ""));
    if !word.eq_ignore_ascii_case("cmd") || cmd.trim().is_empty() {
        return Err(invalid("HEALTHCHECK takes NONE or CMD followed by a command"));
    }
    let cmd = cmd.trim();
    let test = match json_form(cmd) {
        Some(exec) => std::iter::once("CMD".to_string()).chain(exec).collect::<Vec<_>>(),
        None => vec!["CMD-SHELL".to_string(), cmd.to_string()],
    };
    hc.insert("Test".into(), json!(test));
    Ok(Value::Object(hc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(changes: &[&str]) -> Value {
        let mut c = Map::new();
        apply(&mut c, &changes.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        Value::Object(c)
    }

    fn refused(change: &str) -> String {
        apply(&mut Map::new(), &[change.to_string()]).unwrap_err().to_string()
    }

    #[test]
    fn commands_take_the_exec_or_the_shell_form() {
        assert_eq!(applied(&["CMD [\"sh\", \"-l\"]"])["Cmd"], json!(["sh", "-l"]));
        assert_eq!(applied(&["cmd echo hi"])["Cmd"], json!(["/bin/sh", "-c", "echo hi"]));
        // An entrypoint clears a command set before it only when none was set.
        let c = applied(&["ENTRYPOINT [\"/init\"]"]);
        assert_eq!(c["Entrypoint"], json!(["/init"]));
        assert_eq!(c["Cmd"], Value::Null);
        let c = applied(&["CMD [\"x\"]", "ENTRYPOINT /init"]);
        assert_eq!(c["Cmd"], json!(["x"]));
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "/init"]));
    }

    #[test]
    fn env_and_labels_take_pairs_with_quotes_or_the_legacy_form() {
        let c = applied(&[
            "ENV A=1 B=\"two words\" C='x y'",
            "ENV PATH /usr/bin:/bin",
            "ENV A=3",
            "LABEL org.opencontainers.image.title=\"a b\" k=v",
            "LABEL legacy some value",
        ]);
        assert_eq!(c["Env"], json!(["B=two words", "C=x y", "PATH=/usr/bin:/bin", "A=3"]));
        assert_eq!(
            c["Labels"],
            json!({"org.opencontainers.image.title": "a b", "k": "v", "legacy": "some value"})
        );
        assert!(refused("ENV =x").contains("can not be blank"));
        assert!(refused("ENV A=\"open").contains("double-quote"));
    }

    #[test]
    fn ports_volumes_workdir_user_signal_onbuild() {
        let c = applied(&[
            "EXPOSE 80 53/udp 8000-8002",
            "VOLUME [\"/data\", \"/logs\"]",
            "VOLUME /cache",
            "WORKDIR /srv",
            "WORKDIR app/../web",
            "USER 1000:1000",
            "STOPSIGNAL SIGTERM",
            "ONBUILD RUN make",
        ]);
        assert_eq!(
            c["ExposedPorts"],
            json!({"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}, "8002/tcp": {}})
        );
        assert_eq!(c["Volumes"], json!({"/data": {}, "/logs": {}, "/cache": {}}));
        assert_eq!(c["WorkingDir"], json!("/srv/web"));
        assert_eq!(c["User"], json!("1000:1000"));
        assert_eq!(c["StopSignal"], json!("SIGTERM"));
        assert_eq!(c["OnBuild"], json!(["RUN make"]));
        assert!(refused("EXPOSE 70000").contains("invalid port"));
        assert!(refused("EXPOSE 80/icmp").contains("invalid proto"));
        assert!(refused("STOPSIGNAL ;rm").contains("invalid signal"));
        assert!(refused("ONBUILD FROM x").contains("isn't allowed"));
    }

    #[test]
    fn healthchecks_with_options() {
        let c = applied(&["HEALTHCHECK --interval=30s --retries=3 --timeout=1m30s CMD curl -f http://localhost/"]);
        assert_eq!(
            c["Healthcheck"],
            json!({"Interval": 30_000_000_000i64, "Retries": 3, "Timeout": 90_000_000_000i64,
                   "Test": ["CMD-SHELL", "curl -f http://localhost/"]})
        );
        assert_eq!(applied(&["HEALTHCHECK NONE"])["Healthcheck"], json!({"Test": ["NONE"]}));
        assert_eq!(
            applied(&["HEALTHCHECK CMD [\"/ok\"]"])["Healthcheck"],
            json!({"Test": ["CMD", "/ok"]})
        );
        assert!(refused("HEALTHCHECK --interval=soon CMD x").contains("duration"));
    }

    #[test]
    fn other_instructions_are_refused_by_name() {
        assert_eq!(refused("RUN rm -rf /"), "RUN is not a valid change command");
        assert_eq!(
            refused("FROM\u{1b}[31m x"),
            "FROM\\u{1b}[31m is not a valid change command"
        );
        assert!(refused("CMD").contains("requires at least one argument"));
    }
}
