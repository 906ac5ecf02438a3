//! The tensor checksum: xxh3-64 over fixed 4 MiB chunks, combined as a tree of one level.

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

/// Bytes per checksum chunk (and per zstd chunk): 4 MiB.
pub const CHUNK_BYTES: usize = 4 << 20;

/// Name of the checksum algorithm as written in each shard's metadata.
pub const CHECKSUM_ALGO: &str = "xxh3-64/4MiB-tree";

/// The digest of one chunk.
pub(crate) fn chunk_digest(chunk: &[u8]) -> u64 {
    xxh3_64(chunk)
}

/// Combines chunk digests (in chunk order) into the tensor checksum: xxh3-64 of the digests'
/// little-endian bytes, concatenated. Zero chunks (an empty tensor) hash the empty string.
pub(crate) fn combine(digests: &[u64]) -> u64 {
    let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    xxh3_64(&bytes)
}

/// The checksum of `data`, chunks hashed in parallel.
pub fn checksum(data: &[u8]) -> u64 {
    let digests: Vec<u64> = data.par_chunks(CHUNK_BYTES).map(chunk_digest).collect();
    combine(&digests)
}

/// A checksum as written in headers and manifests: always 16 lowercase hex digits, so a
/// header's length is known before its tensors are hashed.
pub fn to_hex(value: u64) -> String {
    format!("{value:016x}")
}

/// Whether `s` looks like [`to_hex`] output.
pub(crate) fn is_hex16(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_tree_of_chunk_digests() {
        let data: Vec<u8> = (0..CHUNK_BYTES * 2 + 17)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let by_hand = combine(&[
            xxh3_64(&data[..CHUNK_BYTES]),
            xxh3_64(&data[CHUNK_BYTES..2 * CHUNK_BYTES]),
            xxh3_64(&data[2 * CHUNK_BYTES..]),
        ]);
        assert_eq!(checksum(&data), by_hand);
        assert_eq!(checksum(&[]), xxh3_64(&[]));
        assert_ne!(checksum(&data[1..]), checksum(&data));
    }

    #[test]
    fn hex_is_fixed_width() {
        assert_eq!(to_hex(1), "0000000000000001");
        assert!(is_hex16(&to_hex(u64::MAX)));
        assert!(!is_hex16("000000000000000G"));
        assert!(!is_hex16("01"));
    }
}
