//! What a pull (and a `load`) reports as it goes: a status per layer in
//! Docker's wording, and lines about the whole. The core only reports;
//! the host decides how it looks (bars, lines, the daemon's JSON stream).

/// What a pull reports as it goes, per layer (by short blob digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    AlreadyExists,
    Waiting,
    Downloading,
    Retrying,
    VerifyingChecksum,
    DownloadComplete,
    Extracting,
    PullComplete,
    /// `load`: a layer being read from an archive and applied.
    LoadingLayer,
}

impl Status {
    /// Docker's wording.
    pub fn docker_text(self) -> &'static str {
        match self {
            Status::AlreadyExists => "Already exists",
            Status::Waiting => "Waiting",
            Status::Downloading => "Downloading",
            Status::Retrying => "Retrying",
            Status::VerifyingChecksum => "Verifying Checksum",
            Status::DownloadComplete => "Download complete",
            Status::Extracting => "Extracting",
            Status::PullComplete => "Pull complete",
            Status::LoadingLayer => "Loading layer",
        }
    }
}

/// Receives progress; the host draws bars or prints lines.
pub trait Progress: Send + Sync {
    /// `id` is the 12-digit short digest of the layer blob.
    fn layer(&self, id: &str, status: Status, current: u64, total: u64);
    /// A line about the whole pull (`latest: Pulling from library/x`).
    fn line(&self, text: &str);
}

/// A progress sink that says nothing.
pub struct Quiet;
impl Progress for Quiet {
    fn layer(&self, _: &str, _: Status, _: u64, _: u64) {}
    fn line(&self, _: &str) {}
}
