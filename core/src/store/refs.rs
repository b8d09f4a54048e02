//! The reference store: `repositories.json`, mapping tags and digests to
//! image IDs, in Docker's format.

use super::write_atomic;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reference::Reference;
use std::collections::BTreeMap;
use std::path::PathBuf;

type Repos = BTreeMap<String, BTreeMap<String, Digest>>;

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct File {
    #[serde(rename = "Repositories", default)]
    repositories: Repos,
}

pub struct RefStore {
    path: PathBuf,
}

impl RefStore {
    pub(super) fn new(path: PathBuf) -> RefStore {
        RefStore { path }
    }

    fn load(&self) -> Result<Repos> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(serde_json::from_slice::<File>(&b)
                .map_err(|e| Error::Integrity(format!("repositories.json is corrupt: {e}")))?
                .repositories),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Repos::new()),
            Err(e) => Err(Error::io("reading repositories.json", e)),
        }
    }

    fn save(&self, repos: Repos) -> Result<()> {
        let f = File { repositories: repos };
        write_atomic(&self.path, serde_json::to_string(&f).expect("serialisable").as_bytes())
    }

    /// Every (reference, image) pair.
    pub fn all(&self) -> Result<Vec<(Reference, Digest)>> {
        let mut out = Vec::new();
        for refs in self.load()?.into_values() {
            for (r, id) in refs {
                out.push((Reference::parse_name_only(&r)?, id));
            }
        }
        Ok(out)
    }

    pub fn get(&self, r: &Reference) -> Result<Option<Digest>> {
        Ok(self
            .load()?
            .get(&r.familiar_name())
            .and_then(|m| m.get(&r.familiar_string()))
            .cloned())
    }

    /// Points `r` at `id`. The caller holds the store's write lock.
    pub fn set(&self, r: &Reference, id: &Digest) -> Result<()> {
        let mut repos = self.load()?;
        repos
            .entry(r.familiar_name())
            .or_default()
            .insert(r.familiar_string(), id.clone());
        self.save(repos)
    }

    /// Removes `r`; returns the image it pointed at.
    pub fn remove(&self, r: &Reference) -> Result<Option<Digest>> {
        let mut repos = self.load()?;
        let name = r.familiar_name();
        let Some(m) = repos.get_mut(&name) else {
            return Ok(None);
        };
        let old = m.remove(&r.familiar_string());
        if m.is_empty() {
            repos.remove(&name);
        }
        if old.is_some() {
            self.save(repos)?;
        }
        Ok(old)
    }

    /// References pointing at `id`.
    pub fn refs_of(&self, id: &Digest) -> Result<Vec<Reference>> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|(_, i)| i == id)
            .map(|(r, _)| r)
            .collect())
    }
}
