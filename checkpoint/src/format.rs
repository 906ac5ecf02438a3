//! The public description of what is saved (dtypes, tensor specs, shard records) and the
//! names of step directories and shard files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};

/// Name of the commit marker and manifest inside a step directory.
pub const COMMITTED_FILE: &str = "COMMITTED";

/// Value of the `format` metadata key of every shard.
pub const FORMAT_NAME: &str = "lazarus-ckpt";

/// Version of the shard and manifest format.
pub const FORMAT_VERSION: u32 = 1;

/// Element type of a tensor, serialized with the safetensors dtype strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// Byte.
    U8,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::U64 | Dtype::I64 => 8,
        }
    }

    /// The safetensors dtype string ("F32", "U8", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::U8 => "U8",
            Dtype::U32 => "U32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
        }
    }

    /// Parses a safetensors dtype string; `None` for dtypes this crate does not write.
    pub fn parse(s: &str) -> Option<Dtype> {
        [Dtype::F32, Dtype::U8, Dtype::U32, Dtype::U64, Dtype::I64]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// Where a tensor sits in a logical flat array sharded over ranks: this tensor holds elements
/// `[offset, offset + len)` of an array of `total` elements (`len` is the tensor's element count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlatSlice {
    /// First element of the slice, in elements.
    pub offset: u64,
    /// Length of the whole flat array, in elements.
    pub total: u64,
}

/// One named tensor a rank saves: its dtype, shape and, for slices of a flat array, the slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Unique name within the shard (not `__metadata__`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape; a flat slice has shape `[len]`.
    pub shape: Vec<usize>,
    /// Set when this tensor is a slice of a logical flat array.
    pub flat: Option<FlatSlice>,
}

impl TensorSpec {
    /// A per-rank tensor that is not part of a flat array.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
            flat: None,
        }
    }

    /// Elements `[offset, offset + len)` of flat array `name` of `total` elements.
    pub fn flat(
        name: impl Into<String>,
        dtype: Dtype,
        offset: u64,
        len: usize,
        total: u64,
    ) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: vec![len],
            flat: Some(FlatSlice { offset, total }),
        }
    }

    /// Number of elements (product of the shape), `None` on overflow.
    pub fn elems(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }

    /// Size in bytes, `None` on overflow.
    pub fn byte_len(&self) -> Option<usize> {
        self.elems()?.checked_mul(self.dtype.size_of())
    }

    /// Checks that the spec is self-consistent: a sane name, and for flat slices a 1-D shape
    /// that fits inside the flat array.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name == "__metadata__" {
            return Err(CheckpointError::bad_input(format!(
                "tensor name `{}` is reserved or empty",
                self.name
            )));
        }
        let Some(_) = self.byte_len() else {
            return Err(CheckpointError::bad_input(format!(
                "tensor `{}`: shape {:?} overflows",
                self.name, self.shape
            )));
        };
        if let Some(flat) = self.flat {
            let len = match self.shape.as_slice() {
                [len] => *len as u64,
                _ => {
                    return Err(CheckpointError::bad_input(format!(
                        "flat tensor `{}` must be 1-D, has shape {:?}",
                        self.name, self.shape
                    )))
                }
            };
            if flat
                .offset
                .checked_add(len)
                .is_none_or(|end| end > flat.total)
            {
                return Err(CheckpointError::bad_input(format!(
                    "flat tensor `{}`: slice [{}, {}+{}) exceeds total {}",
                    self.name, flat.offset, flat.offset, len, flat.total
                )));
            }
        }
        Ok(())
    }
}

/// How tensor bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw little-endian bytes; restore is zero-copy.
    #[default]
    None,
    /// Independent zstd frames of 4 MiB of raw bytes each, at this level.
    Zstd {
        /// zstd compression level (1..=22; 1-3 are fast).
        level: i32,
    },
}

impl Compression {
    /// The value of the `compression` metadata key.
    pub fn as_metadata(self) -> String {
        match self {
            Compression::None => "none".to_string(),
            Compression::Zstd { level } => format!("zstd-{level}/4MiB-chunks"),
        }
    }
}

/// Who wrote a shard, and for which step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Training step the shard belongs to.
    pub step: u64,
    /// Writing rank.
    pub rank: usize,
    /// Number of ranks of the run that wrote it.
    pub world_size: usize,
    /// Hash of the parameter layout, opaque to this crate.
    pub layout_hash: String,
}

/// One tensor of a written shard, as recorded in the header and the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Logical dtype (before compression).
    pub dtype: Dtype,
    /// Logical shape (before compression).
    pub shape: Vec<usize>,
    /// The flat slice, for slices of a flat array.
    pub flat: Option<FlatSlice>,
    /// Checksum of the stored bytes, 16 hex digits (see [`crate::CHECKSUM_ALGO`]).
    pub checksum: String,
    /// Bytes the tensor occupies in the file.
    pub stored_bytes: u64,
}

/// A written shard: the file, its size, the hash of its header bytes, and its tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the step directory.
    pub file: String,
    /// File size in bytes.
    pub size: u64,
    /// xxh3-64 (16 hex digits) of the first `8 + N` bytes: length prefix and JSON header.
    pub header_xxh3: String,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorRecord>,
}

/// File name of rank `rank`'s shard in a run of `world_size` ranks:
/// `shard-00000-of-00004.safetensors`.
pub fn shard_file_name(rank: usize, world_size: usize) -> String {
    format!("shard-{rank:05}-of-{world_size:05}.safetensors")
}

/// Name of the directory of step `step`: `step_000001200`.
pub fn step_dir_name(step: u64) -> String {
    format!("step_{step:09}")
}

/// The step of a directory named by [`step_dir_name`]; `None` for any other name.
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    if digits.len() < 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` looks like a shard file of any world size (used to find extra shards).
pub(crate) fn is_shard_file_name(name: &str) -> bool {
    name.starts_with("shard-") && name.ends_with(".safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(shard_file_name(0, 4), "shard-00000-of-00004.safetensors");
        assert_eq!(step_dir_name(1200), "step_000001200");
        assert_eq!(parse_step_dir_name("step_000001200"), Some(1200));
        assert_eq!(parse_step_dir_name("step_12"), None);
        assert_eq!(parse_step_dir_name("step_00000120x"), None);
        assert_eq!(parse_step_dir_name("tmp_000001200"), None);
    }

    #[test]
    fn dtype_strings_match_safetensors() {
        assert_eq!(
            serde_json::to_string(&Dtype::F32).ok().as_deref(),
            Some("\"F32\"")
        );
        assert_eq!(
            serde_json::to_string(&Dtype::I64).ok().as_deref(),
            Some("\"I64\"")
        );
        for d in [Dtype::F32, Dtype::U8, Dtype::U32, Dtype::U64, Dtype::I64] {
            assert_eq!(Dtype::parse(d.as_str()), Some(d));
        }
    }

    #[test]
    fn spec_validation() {
        assert!(TensorSpec::flat("w", Dtype::F32, 8, 2, 10)
            .validate()
            .is_ok());
        assert!(TensorSpec::flat("w", Dtype::F32, 9, 2, 10)
            .validate()
            .is_err());
        assert!(TensorSpec::new("__metadata__", Dtype::U8, vec![1])
            .validate()
            .is_err());
        let mut bad = TensorSpec::flat("w", Dtype::F32, 0, 2, 10);
        bad.shape = vec![1, 2];
        assert!(bad.validate().is_err());
    }
}
