//! The layer rules: what one layer may do to the stack below it, decided
//! by the core from the tar headers it streams, the same for every driver.
//!
//! A driver applies a layer its own way (vfs into a full copy of the tree,
//! overlay2 into an empty upper directory), so an entry that writes through
//! a symbolic link would land in the link's target on one and replace the
//! link on the other. The core never lets a driver decide that: it refuses,
//! before the driver sees the header,
//! - a name that is absolute or climbs with `..` (a hard link's target too);
//! - an entry, whiteout (`.wh.NAME`) or opaque marker (`.wh..wh..opq`)
//!   whose parent path passes through a symbolic link, made by an earlier
//!   layer or earlier in the same one, and a hard link whose target does;
//! - a directory at, or any entry beneath, a path the same layer whited
//!   out (overlay2 would show the lower contents again, vfs would not);
//! - a 0/0 character device, which is overlayfs's own spelling of a
//!   whiteout (a layer spells deletions as `.wh.` files).
//!
//! State is kept per layer stack ([`LayerRules`]): the live symbolic links,
//! and when each directory was last emptied (by a whiteout or an opaque
//! marker), so a link an upper layer removed no longer counts. It costs
//! about 16 bytes per link and per whiteout, never per file: paths are kept
//! as 64-bit hashes keyed at random per process (a collision cannot be
//! aimed at). A stack already stored is read back from its layers'
//! tar-split records ([`LayerRules::replay`]), which never refuses.
//!
//! This module must never touch a file system: it judges headers only.

use crate::tarsplit::EntryHeader;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

const WH_PREFIX: &[u8] = b".wh.";
const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// Why an entry was refused: one line, names quoted as untrusted bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tar entry {entry}: {why}")]
pub struct Refusal {
    entry: String,
    why: String,
}

impl Refusal {
    fn new(name: &[u8], why: String) -> Refusal {
        Refusal {
            entry: crate::text::quote_bytes(name),
            why,
        }
    }
}

/// The rules' view of a layer stack, carried from one layer to the next.
#[derive(Clone)]
pub struct LayerRules {
    hasher: std::collections::hash_map::RandomState,
    /// Live symbolic links: path hash → when each was made.
    links: HashMap<u64, u64>,
    /// Directories emptied: path hash → when; links strictly beneath made
    /// before then are gone.
    cleared: HashMap<u64, u64>,
    /// Paths the current layer whited out.
    whited: HashSet<u64>,
    /// A counter of entries across the stack.
    now: u64,
    /// `now` when the current layer began.
    layer_start: u64,
}

impl Default for LayerRules {
    fn default() -> Self {
        LayerRules::new()
    }
}

/// How an entry is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A layer being applied: refuse what breaks the rules.
    Check,
    /// A layer already stored: only record its effects.
    Replay,
}

impl LayerRules {
    /// The rules for an empty stack.
    pub fn new() -> LayerRules {
        LayerRules {
            hasher: std::collections::hash_map::RandomState::new(),
            links: HashMap::new(),
            cleared: HashMap::new(),
            whited: HashSet::new(),
            now: 0,
            layer_start: 0,
        }
    }

    /// Starts the next layer of the stack.
    pub fn begin_layer(&mut self) {
        self.whited.clear();
        // Strictly after every entry below, strictly before every entry of
        // this layer: an opaque marker empties exactly what lies below.
        self.now += 1;
        self.layer_start = self.now;
    }

    /// How many symbolic links are live in the stack.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Judges one entry of the layer being applied and records its effect.
    pub fn check(&mut self, h: &EntryHeader) -> Result<(), Refusal> {
        self.entry(h, Mode::Check)
    }

    /// Records the effect of one entry of a stored layer, refusing nothing.
    pub fn replay(&mut self, h: &EntryHeader) {
        let _ = self.entry(h, Mode::Replay);
    }

    /// The keyed hashes of each leading part of `comps`: `a`, `a/b`, …
    fn prefixes(&self, comps: &[&[u8]]) -> Vec<u64> {
        let mut h = self.hasher.build_hasher();
        comps
            .iter()
            .map(|c| {
                h.write(c);
                h.write_u8(b'/');
                h.clone().finish()
            })
            .collect()
    }

    /// Why a path whose leading parts are `comps` (their hashes
    /// `parents`, outermost first) may not be written: it passes through a
    /// live link, or lies beneath a path this layer whited out.
    fn blocked(&self, comps: &[&[u8]], parents: &[u64]) -> Option<String> {
        for (i, p) in parents.iter().enumerate() {
            if self.whited.contains(p) {
                return Some(format!(
                    "its parent {} was whited out earlier in the same layer",
                    quoted(&comps[..=i])
                ));
            }
            if self.live_link(*p, &parents[..i]) {
                return Some(format!(
                    "its path passes through a link, {} (a layer may not write through a symbolic link)",
                    quoted(&comps[..=i])
                ));
            }
        }
        None
    }

    /// Whether `path` is a link no directory above it (`above`) was emptied
    /// of since it was made.
    fn live_link(&self, path: u64, above: &[u64]) -> bool {
        let Some(made) = self.links.get(&path) else {
            return false;
        };
        !above.iter().any(|a| self.cleared.get(a).is_some_and(|at| at > made))
    }

    fn entry(&mut self, h: &EntryHeader, mode: Mode) -> Result<(), Refusal> {
        let check = mode == Mode::Check;
        if h.kind == b'g' {
            return Ok(()); // a global header: no entry to the unpacker
        }
        self.now += 1;
        let comps = match crate::path::components_bytes(&h.name) {
            Ok(c) => c,
            Err(e) if check => return Err(Refusal::new(&h.name, name_refusal(&h.name, e))),
            Err(_) => return Ok(()),
        };
        let Some((last, parents)) = comps.split_last() else {
            return Ok(()); // the root itself
        };
        if check {
            if h.kind == b'3' && h.dev == (0, 0) {
                return Err(Refusal::new(
                    &h.name,
                    "it is a 0/0 character device, overlayfs's whiteout: a layer deletes with `.wh.` files".into(),
                ));
            }
            if h.kind == b'1' {
                self.check_hard_link(h)?;
            }
        }
        let whiteout = last.strip_prefix(WH_PREFIX);
        // Most entries of most stacks: no link to pass through, nothing
        // whited out, nothing to record. No hashing.
        if self.links.is_empty() && self.whited.is_empty() && whiteout.is_none() && h.kind != b'2' {
            return Ok(());
        }
        let hashes = self.prefixes(&comps);
        let (own, above) = hashes.split_last().expect("not empty");
        if check {
            if let Some(why) = self.blocked(parents, above) {
                return Err(Refusal::new(&h.name, why));
            }
        }
        if let Some(target) = whiteout {
            if *last == WH_OPAQUE {
                // What lower layers put in the directory goes; this layer's stays.
                if let Some(dir) = above.last() {
                    let at = self.cleared.entry(*dir).or_insert(0);
                    *at = (*at).max(self.layer_start);
                } else if !self.links.is_empty() {
                    // At the top: every lower link goes.
                    let start = self.layer_start;
                    self.links.retain(|_, made| *made >= start);
                }
                return Ok(());
            }
            let mut hasher = self.hasher.build_hasher();
            for c in parents {
                hasher.write(c);
                hasher.write_u8(b'/');
            }
            hasher.write(target);
            hasher.write_u8(b'/');
            let gone = hasher.finish();
            self.links.remove(&gone);
            if !self.links.is_empty() {
                self.cleared.insert(gone, self.now);
            }
            self.whited.insert(gone);
            return Ok(());
        }
        if check && h.kind == b'5' && self.whited.contains(own) {
            return Err(Refusal::new(
                &h.name,
                "a directory that was whited out earlier in the same layer (a layer that empties a directory marks it opaque)"
                    .into(),
            ));
        }
        if h.kind == b'2' {
            self.links.insert(*own, self.now);
        } else {
            self.links.remove(own);
        }
        Ok(())
    }

    fn check_hard_link(&self, h: &EntryHeader) -> Result<(), Refusal> {
        let target = h.link.as_deref().unwrap_or_default();
        let comps = crate::path::components_bytes(target)
            .map_err(|e| Refusal::new(&h.name, format!("its target: {}", name_refusal(target, e))))?;
        if self.links.is_empty() && self.whited.is_empty() {
            return Ok(());
        }
        let Some((_, parents)) = comps.split_last() else {
            return Ok(());
        };
        let hashes = self.prefixes(&comps);
        match self.blocked(parents, &hashes[..parents.len()]) {
            Some(why) => Err(Refusal::new(
                &h.name,
                format!("its target {}: {why}", crate::text::quote_bytes(target)),
            )),
            None => Ok(()),
        }
    }
}

fn name_refusal(name: &[u8], e: crate::path::Unsafe) -> String {
    let shown = crate::text::quote_bytes(name);
    match e {
        crate::path::Unsafe::Absolute => format!("absolute path {shown} is not allowed"),
        crate::path::Unsafe::Climbs => format!("path {shown} leaves its directory"),
    }
}

fn quoted(comps: &[&[u8]]) -> String {
    crate::text::quote_bytes(&comps.join(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: u8, name: &str) -> EntryHeader {
        EntryHeader {
            name: name.as_bytes().to_vec(),
            link: None,
            kind,
            size: 0,
            dev: (1, 1),
            ..EntryHeader::default()
        }
    }

    fn link(name: &str, target: &str) -> EntryHeader {
        EntryHeader {
            link: Some(target.as_bytes().to_vec()),
            ..e(b'2', name)
        }
    }

    fn stack(layers: &[&[EntryHeader]]) -> Result<(), Refusal> {
        let mut r = LayerRules::new();
        for l in layers {
            r.begin_layer();
            for h in *l {
                r.check(h)?;
            }
        }
        Ok(())
    }

    /// A directory, a link to it, and a link to it from a subdirectory.
    fn links_below() -> [EntryHeader; 4] {
        [
            e(b'5', "real/"),
            link("lnk", "real"),
            e(b'5', "d/"),
            link("d/in", "../real"),
        ]
    }

    #[test]
    fn refuses_writes_through_links_of_any_layer() {
        let below = links_below();
        for bad in [
            e(b'0', "lnk/f"),
            e(b'5', "lnk/sub/"),
            e(b'0', "lnk/.wh.x"),
            e(b'0', "lnk/.wh..wh..opq"),
            e(b'0', "d/in/deep/f"),
            EntryHeader {
                link: Some(b"lnk/x".to_vec()),
                ..e(b'1', "h")
            },
        ] {
            let err = stack(&[&below, std::slice::from_ref(&bad)]).unwrap_err();
            assert!(err.to_string().contains("passes through a link"), "{err}");
            // Within one layer too.
            let mut same = below.to_vec();
            same.push(bad.clone());
            assert!(stack(&[&same]).is_err());
        }
    }

    #[test]
    fn a_link_removed_or_replaced_no_longer_counts() {
        let below = links_below();
        let ok: Vec<Vec<Vec<EntryHeader>>> = vec![
            vec![vec![e(b'5', "lnk/"), e(b'0', "lnk/f")]],
            vec![vec![e(b'0', ".wh.lnk")], vec![e(b'0', "lnk/f")]],
            vec![vec![e(b'0', "d/.wh..wh..opq"), e(b'0', "d/in/f")]],
            vec![vec![e(b'0', ".wh.d")], vec![e(b'0', "d/in/f")]],
            vec![vec![e(b'0', ".wh..wh..opq"), e(b'0', "lnk/f")]],
            vec![vec![e(b'0', "lnk")], vec![e(b'0', "lnk2")]],
        ];
        for later in ok {
            let mut layers: Vec<&[EntryHeader]> = vec![&below];
            layers.extend(later.iter().map(|l| l.as_slice()));
            stack(&layers).unwrap();
        }
        // An opaque marker keeps the links its own layer made.
        let same = [
            e(b'5', "o/"),
            e(b'5', "real/"),
            link("o/l", "../real"),
            e(b'0', "o/.wh..wh..opq"),
        ];
        assert!(stack(&[&same, &[e(b'0', "o/l/f")]]).is_err());
    }

    #[test]
    fn refuses_a_directory_where_the_layer_whited_one_out_and_whiteout_devices() {
        let below = [e(b'5', "d/"), e(b'0', "d/old")];
        assert!(stack(&[&below, &[e(b'0', ".wh.d"), e(b'5', "d/")]]).is_err());
        assert!(stack(&[&below, &[e(b'0', ".wh.d"), e(b'0', "d/new")]]).is_err());
        // A file again is fine: it replaces what the whiteout removed alike.
        stack(&[&below, &[e(b'0', ".wh.d"), e(b'0', "d")]]).unwrap();
        let dev = EntryHeader {
            dev: (0, 0),
            ..e(b'3', "ghost")
        };
        assert!(stack(&[&[dev]])
            .unwrap_err()
            .to_string()
            .contains("0/0 character device"));
        stack(&[&[e(b'3', "null")]]).unwrap();
    }

    #[test]
    fn refuses_escaping_names_and_link_targets() {
        assert!(stack(&[&[e(b'0', "../x")]])
            .unwrap_err()
            .to_string()
            .contains("leaves its directory"));
        assert!(stack(&[&[e(b'0', "/x")]])
            .unwrap_err()
            .to_string()
            .contains("absolute path"));
        let hl = EntryHeader {
            link: Some(b"../../etc/passwd".to_vec()),
            ..e(b'1', "hl")
        };
        assert!(stack(&[&[hl]])
            .unwrap_err()
            .to_string()
            .contains("leaves its directory"));
    }
}
