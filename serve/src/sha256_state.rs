//! A SHA-256 whose state can be written down and picked up again by
//! another process: an upload session on an object store is continued by
//! whichever replica the client's next chunk reaches, and that replica
//! must hash only the chunk, not re-read everything before it.
//!
//! `sha2`'s hasher keeps its state private, so this keeps the state itself
//! (the eight words, the length, the partial block) and runs `sha2`'s own
//! compression function over whole blocks (`compress256`, with the same
//! SHA-NI / AVX2 dispatch the hasher uses). Only the padding is written
//! here, checked against `sha2::Sha256` in the tests.

use sha2::digest::generic_array::GenericArray;

const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The running state, serialisable as hex.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sha256State {
    /// The eight chaining words, as 64 hex digits.
    #[serde(with = "words")]
    h: [u32; 8],
    /// Bytes hashed so far, the partial block included.
    len: u64,
    /// The bytes after the last whole block (fewer than 64), as hex.
    #[serde(with = "hex_bytes")]
    pending: Vec<u8>,
}

impl Default for Sha256State {
    fn default() -> Self {
        Sha256State {
            h: INITIAL,
            len: 0,
            pending: Vec::new(),
        }
    }
}

impl Sha256State {
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the partial block is as long as the length says (a state
    /// read back from elsewhere is checked before use).
    pub fn consistent(&self) -> bool {
        self.pending.len() as u64 == self.len % 64
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (64 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 64 {
                return;
            }
            let block = std::mem::take(&mut self.pending);
            self.compress(&block);
        }
        let whole = data.len() - data.len() % 64;
        self.compress(&data[..whole]);
        self.pending.extend_from_slice(&data[whole..]);
    }

    fn compress(&mut self, blocks: &[u8]) {
        for block in blocks.chunks_exact(64) {
            sha2::compress256(&mut self.h, std::slice::from_ref(GenericArray::from_slice(block)));
        }
    }

    /// The digest of everything hashed (the state is left as it was).
    pub fn finish(&self) -> [u8; 32] {
        let mut s = self.clone();
        let bits = s.len.wrapping_mul(8);
        let mut tail = std::mem::take(&mut s.pending);
        tail.push(0x80);
        while tail.len() % 64 != 56 {
            tail.push(0);
        }
        tail.extend_from_slice(&bits.to_be_bytes());
        s.compress(&tail);
        let mut out = [0u8; 32];
        for (i, w) in s.h.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

mod words {
    pub fn serialize<S: serde::Serializer>(h: &[u32; 8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.iter().map(|w| format!("{w:08x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u32; 8], D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        let bad = || serde::de::Error::custom("not 64 hex digits");
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut h = [0u32; 8];
        for (i, w) in h.iter_mut().enumerate() {
            *w = u32::from_str_radix(&s[i * 8..i * 8 + 8], 16).map_err(|_| bad())?;
        }
        Ok(h)
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        let bad = || serde::de::Error::custom("not a partial block in hex");
        if !s.len().is_multiple_of(2) || s.len() >= 128 || !s.is_ascii() {
            return Err(bad());
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| bad()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn matches_sha2_at_every_length_and_split_and_survives_a_round_trip() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 200, 300] {
            let want: [u8; 32] = sha2::Sha256::digest(&data[..n]).into();
            for split in [0, 1, 13, 64, n / 2, n] {
                let split = split.min(n);
                let mut s = Sha256State::default();
                s.update(&data[..split]);
                let text = serde_json::to_string(&s).unwrap();
                let mut s: Sha256State = serde_json::from_str(&text).unwrap();
                s.update(&data[split..n]);
                assert_eq!(s.finish(), want, "length {n}, split at {split}");
                assert_eq!(s.len(), n as u64);
            }
        }
    }

    #[test]
    fn a_damaged_state_is_refused() {
        assert!(serde_json::from_str::<Sha256State>(r#"{"h":"00","len":0,"pending":""}"#).is_err());
        let long = "00".repeat(64);
        let text = format!(r#"{{"h":"{}","len":0,"pending":"{long}"}}"#, "0".repeat(64));
        assert!(serde_json::from_str::<Sha256State>(&text).is_err());
    }
}
