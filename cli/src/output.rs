//! Formatting of what users read: sizes, ages, progress.

use gantry_core::pull::{Progress, Status};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Docker's size format: decimal units, three significant digits.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    let s = if v >= 100.0 || u == 0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", UNITS[u])
}

/// Docker's "2 days ago".
pub fn human_age(secs_ago: i64) -> String {
    let s = secs_ago.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    let t = if s < 1 {
        "Less than a second".to_string()
    } else if s < 60 {
        format!("{s} seconds")
    } else if m == 1 {
        "About a minute".to_string()
    } else if m < 60 {
        format!("{m} minutes")
    } else if h == 1 {
        "About an hour".to_string()
    } else if h < 48 {
        format!("{h} hours")
    } else if d < 14 {
        format!("{d} days")
    } else if d < 60 {
        format!("{} weeks", d / 7)
    } else if d < 730 {
        format!("{} months", d / 30)
    } else {
        format!("{} years", d / 365)
    };
    format!("{t} ago")
}

pub use gantry_core::date::parse_rfc3339;

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Pull progress: bars on a terminal, Docker's plain lines otherwise.
pub enum PullProgress {
    Bars {
        multi: MultiProgress,
        bars: Mutex<HashMap<String, ProgressBar>>,
    },
    Lines {
        last: Mutex<HashMap<String, Status>>,
    },
    Quiet,
}

impl PullProgress {
    pub fn new(quiet: bool) -> PullProgress {
        if quiet {
            PullProgress::Quiet
        } else if std::io::stdout().is_terminal() {
            PullProgress::Bars {
                multi: MultiProgress::new(),
                bars: Mutex::new(HashMap::new()),
            }
        } else {
            PullProgress::Lines {
                last: Mutex::new(HashMap::new()),
            }
        }
    }
}

impl Progress for PullProgress {
    fn layer(&self, id: &str, status: Status, current: u64, total: u64) {
        match self {
            PullProgress::Quiet => {}
            PullProgress::Lines { last } => {
                let mut g = last.lock().unwrap();
                if g.get(id) == Some(&status) {
                    return;
                }
                let first = !g.contains_key(id);
                g.insert(id.to_string(), status);
                let mut out = std::io::stdout().lock();
                if first && status != Status::AlreadyExists {
                    let _ = writeln!(out, "{id}: Pulling fs layer");
                }
                let _ = writeln!(out, "{id}: {}", status.docker_text());
            }
            PullProgress::Bars { multi, bars } => {
                let mut g = bars.lock().unwrap();
                let bar = g.entry(id.to_string()).or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(total.max(1)));
                    b.set_style(
                        ProgressStyle::with_template("{prefix}: {msg:<18} [{bar:40}] {bytes}/{total_bytes}")
                            .expect("valid template")
                            .progress_chars("=> "),
                    );
                    b.set_prefix(id.to_string());
                    b
                });
                bar.set_message(status.docker_text());
                match status {
                    Status::Downloading | Status::VerifyingChecksum | Status::DownloadComplete => {
                        bar.set_length(total.max(1));
                        bar.set_position(current);
                    }
                    Status::LoadingLayer => {
                        bar.set_length(total.max(1));
                        bar.set_position(current);
                        if current >= total {
                            bar.finish();
                        }
                    }
                    Status::PullComplete | Status::AlreadyExists => {
                        bar.set_style(ProgressStyle::with_template("{prefix}: {msg}").expect("valid template"));
                        bar.finish_with_message(status.docker_text());
                    }
                    _ => {}
                }
            }
        }
    }

    fn line(&self, text: &str) {
        match self {
            PullProgress::Quiet => {}
            PullProgress::Bars { multi, bars } => {
                // Above the bars while they run; below them once all are done,
                // so the closing lines come last, as Docker prints them.
                if bars.lock().unwrap().values().all(|b| b.is_finished()) {
                    println!("{text}");
                } else {
                    let _ = multi.println(text);
                }
            }
            PullProgress::Lines { .. } => println!("{text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_like_docker() {
        assert_eq!(human_size(5), "5B");
        assert_eq!(human_size(1234), "1.23kB");
        assert_eq!(human_size(77_834_000), "77.8MB");
        assert_eq!(human_size(500_000_000), "500MB");
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00Z"), Some(86400));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5+01:00"), Some(1_700_000_000 - 3600));
        assert_eq!(human_age(3 * 86400), "3 days ago");
    }
}
