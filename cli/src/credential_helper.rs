//! Docker's credential helpers: `docker-credential-NAME get`, the server's
//! address on standard input, `{"ServerURL","Username","Secret"}` on
//! standard output. The program is found in `PATH` and run directly, never
//! through a shell; it runs in a process group of its own so that a
//! timeout ends it and everything it started (`pass` runs `gpg`).
//!
//! Written here rather than taken from a crate: the protocol is one
//! request, and what gantry needs (a bound on the answer, a deadline that
//! kills a hung helper's whole group, one-line errors) is most of the code.

use gantry_core::plugin::Credentials;
use gantry_core::text::quote_bytes;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most of a helper's answer that is read (a token is a few KiB).
const MAX_ANSWER: u64 = 1 << 20;

/// What helpers print when they hold nothing for the server.
const NOT_FOUND: &str = "credentials not found in native keychain";

/// Whether `name` may name a helper: `docker-credential-NAME` must be a
/// program name looked up in `PATH`, never a path.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

/// Asks helper `name` for `server`'s credentials: `None` when it has none.
/// The error is one line naming the program.
pub fn get(name: &str, server: &str, timeout: Duration) -> Result<Option<Credentials>, String> {
    let program = format!("docker-credential-{name}");
    let (status, out, err) = run(&program, server, timeout).map_err(|e| format!("{program}: {e}"))?;
    if !status.success() {
        let said = if out.iter().any(|b| !b.is_ascii_whitespace()) {
            &out
        } else {
            &err
        };
        if String::from_utf8_lossy(said).trim() == NOT_FOUND {
            return Ok(None);
        }
        return Err(format!(
            "{program} get failed ({status}): {}",
            quote_bytes(said.trim_ascii())
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    // What it printed is never quoted: it may hold the secret itself.
    let a: Answer = serde_json::from_slice(&out).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax => "a syntax error",
            serde_json::error::Category::Data => "not the fields of credentials",
            serde_json::error::Category::Eof => "it ends early",
            serde_json::error::Category::Io => "unreadable",
        };
        format!(
            "{program} get answered {} bytes that are not credentials JSON ({what} at line {}, column {})",
            out.len(),
            e.line(),
            e.column()
        )
    })?;
    Ok(match (a.username.as_str(), a.secret) {
        // Older helpers answer empty credentials for an unknown server.
        (_, s) if s.is_empty() => None,
        // Docker's convention for an identity (refresh) token.
        ("<token>", token) => Some(Credentials {
            username: String::new(),
            password: String::new(),
            identity_token: Some(token),
        }),
        (user, password) => Some(Credentials {
            username: user.to_string(),
            password,
            identity_token: None,
        }),
    })
}

/// Runs `program get` with `input` on its standard input: its exit status,
/// standard output and (the first KiBs of) standard error.
fn run(program: &str, input: &str, timeout: Duration) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), String> {
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "not found in PATH".to_string(),
            _ => format!("cannot run it: {e}"),
        })?;
    // SAFETY: kill(2) with a negative pid signals that process group; it
    // is called only while the leader is not yet reaped, so the group's id
    // cannot have been reused.
    let group = child.id() as i32;
    let kill_group = || unsafe { libc::kill(-group, libc::SIGKILL) };
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.as_bytes().to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let read = |pipe: Option<Box<dyn Read + Send>>, limit: u64| {
        let (tx, rx) = mpsc::channel();
        if let Some(pipe) = pipe {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut pipe = pipe;
                let _ = (&mut pipe).take(limit).read_to_end(&mut buf);
                // The rest is read and dropped: a helper writing more must
                // not die of a closed pipe.
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
                let _ = tx.send(buf);
            });
        }
        rx
    };
    let out = read(
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        MAX_ANSWER,
    );
    let err = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), 4096);
    let deadline = Instant::now() + timeout;
    let status = loop {
        // Waiting without reaping keeps the group's id ours until the
        // end: what the helper started is killed with it on every path.
        match child_exited(&child) {
            Ok(true) => {
                kill_group();
                break child.wait().map_err(|e| format!("waiting for it: {e}"))?;
            }
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(false) => {
                kill_group();
                let _ = child.wait();
                return Err(format!("did not answer within {} s", timeout.as_secs_f64()));
            }
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(format!("waiting for it: {e}"));
            }
        }
    };
    // Everything in the group is gone: the pipes are at their end, unless
    // it left the group (a helper that daemonizes): no more than a moment.
    let out = out
        .recv_timeout(Duration::from_secs(1))
        .map_err(|_| "its output did not end when it exited".to_string())?;
    let err = err.recv_timeout(Duration::from_millis(100)).unwrap_or_default();
    Ok((status, out, err))
}

/// Whether `child` has exited, leaving it unreaped (`waitid` with `WNOWAIT`).
fn child_exited(child: &std::process::Child) -> std::io::Result<bool> {
    let pid = rustix::process::Pid::from_child(child);
    let flags = rustix::process::WaitIdOptions::EXITED
        | rustix::process::WaitIdOptions::NOHANG
        | rustix::process::WaitIdOptions::NOWAIT;
    Ok(rustix::process::waitid(rustix::process::WaitId::Pid(pid), flags)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_program_names_never_paths() {
        for ok in ["pass", "ecr-login", "desktop.exe", "gcloud_2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".", "..", "a b", "x;rm"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
