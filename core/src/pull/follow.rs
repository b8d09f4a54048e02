//! Applying a layer while its blob downloads: the downloader reports each
//! write, a restart from zero (a registry that cannot resume) and the end
//! on a [`Live`]; a [`Follow`] reads the spool file up to what was written.
//! A follower never yields a byte of an unverified blob as its end: it
//! ends only once the download is complete and its digest checked.

use super::download::Spooled;
use crate::error::Result;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// A download as it happens, shared by its downloader and its follower.
#[derive(Default)]
pub(crate) struct Live {
    state: Mutex<LiveState>,
    cv: Condvar,
}

#[derive(Default)]
pub(crate) struct LiveState {
    pub(crate) path: Option<PathBuf>,
    pub(crate) written: u64,
    /// Bumped when the download starts over; a follower must too.
    pub(crate) generation: u32,
    /// `Some(true)` once the blob is complete and its digest verified.
    done: Option<bool>,
}

impl Live {
    pub(crate) fn update(&self, f: impl FnOnce(&mut LiveState)) {
        f(&mut self.state.lock().unwrap());
        self.cv.notify_all();
    }

    /// The download ended: verified (with its file) or failed.
    pub(crate) fn finish(&self, r: &Result<Arc<Spooled>>) {
        self.update(|st| match r {
            Ok(spooled) => {
                if st.path.as_deref() != Some(spooled.path()) {
                    // Another pull's download, shared: the whole file is there.
                    st.path = Some(spooled.path().to_path_buf());
                    st.written = std::fs::metadata(spooled.path()).map(|m| m.len()).unwrap_or(0);
                    st.generation += 1;
                }
                st.done = Some(true);
            }
            Err(_) => st.done = Some(false),
        });
    }
}

/// Reads a download as it is written. It ends only once the download is
/// complete and its digest verified; if the download fails or starts over,
/// it fails and raises `interrupted`: the layer is applied again from the
/// finished file, or the download's own error is reported. `waited` says it
/// had to wait for bytes: a driver call that then ran past its wall-clock
/// deadline (the wait counts) is tried again from the finished file too.
pub(crate) struct Follow<'a> {
    live: &'a Live,
    file: Option<File>,
    pos: u64,
    generation: u32,
    interrupted: Arc<AtomicBool>,
    waited: Arc<AtomicBool>,
}

/// What a follower saw, read after the apply it fed has returned.
#[derive(Clone, Default)]
pub(crate) struct Seen {
    interrupted: Arc<AtomicBool>,
    waited: Arc<AtomicBool>,
}

impl Seen {
    /// The download failed or started over under the follower.
    pub(crate) fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// The follower had to wait for bytes.
    pub(crate) fn waited(&self) -> bool {
        self.waited.load(Ordering::Relaxed)
    }
}

impl<'a> Follow<'a> {
    /// A follower of `live` from its first byte, and what it will have seen.
    pub(crate) fn new(live: &'a Live) -> (Follow<'a>, Seen) {
        let seen = Seen::default();
        let follow = Follow {
            live,
            file: None,
            pos: 0,
            generation: 0,
            interrupted: seen.interrupted.clone(),
            waited: seen.waited.clone(),
        };
        (follow, seen)
    }

    fn interrupted(&self, why: &str) -> std::io::Error {
        self.interrupted.store(true, Ordering::Relaxed);
        std::io::Error::other(why.to_string())
    }

    /// Waits until bytes past `pos` are written or the download ended;
    /// how many are there, whether it is complete, and the file.
    fn available(&self) -> std::io::Result<(u64, bool, Option<PathBuf>)> {
        let mut st = self.live.state.lock().unwrap();
        loop {
            if st.generation != self.generation {
                return Err(self.interrupted("the download started over"));
            }
            if st.done == Some(false) {
                return Err(self.interrupted("the download failed"));
            }
            if st.path.is_some() && (st.written > self.pos || st.done == Some(true)) {
                return Ok((st.written - self.pos, st.done == Some(true), st.path.clone()));
            }
            self.waited.store(true, Ordering::Relaxed);
            st = self.live.cv.wait(st).unwrap();
        }
    }

    /// The spool file could not be opened: a failed download removes its
    /// file before it says so, so wait for its word and report its failure
    /// rather than the missing file.
    fn open_failed(&self, e: std::io::Error) -> std::io::Error {
        let generation = self.generation;
        let st = self.live.state.lock().unwrap();
        let st = self
            .live
            .cv
            .wait_while(st, |st| st.done.is_none() && st.generation == generation)
            .unwrap();
        let failed = st.generation != generation || st.done == Some(false);
        drop(st);
        if failed {
            self.interrupted("the download failed")
        } else {
            e
        }
    }
}

impl Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (avail, done, path) = self.available()?;
        if avail == 0 && done {
            return Ok(0);
        }
        if self.file.is_none() {
            match File::open(path.expect("known")) {
                Ok(f) => self.file = Some(f),
                Err(e) => return Err(self.open_failed(e)),
            }
        }
        let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
        let n = self.file.as_mut().expect("opened").read(&mut buf[..want])?;
        // Bytes read after a restart would belong to the new download.
        if self.live.state.lock().unwrap().generation != self.generation {
            return Err(self.interrupted("the download started over"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::time::Duration;

    /// A download that fails with a digest mismatch removes its spool file
    /// and only then says it failed; a follower that reaches for the file
    /// in between reports the download's failure, not the missing file.
    #[test]
    fn a_follower_that_finds_the_file_gone_waits_for_the_download_s_word() {
        let dir = tempfile::tempdir().unwrap();
        let live = Live::default();
        live.update(|st| {
            st.path = Some(dir.path().join("gone"));
            st.written = 10;
        });
        let (mut follow, seen) = Follow::new(&live);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                live.finish(&Err(Error::Integrity("digest mismatch".into())));
            });
            let err = follow.read(&mut [0u8; 16]).unwrap_err();
            assert!(seen.interrupted(), "{err}");
        });
    }
}
