//! The safetensors header of a shard: building it before writing and parsing and validating
//! it after reading, before any byte of tensor data is trusted or mapped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_64;

use crate::checksum::{is_hex16, to_hex, CHECKSUM_ALGO};
use crate::error::{CheckpointError, Result};
use crate::format::{
    Compression, Dtype, FlatSlice, ShardInfo, ShardMeta, TensorRecord, TensorSpec, FORMAT_NAME,
    FORMAT_VERSION,
};

/// Largest JSON header accepted (the safetensors limit).
pub(crate) const HEADER_BYTES_MAX: u64 = 100_000_000;

/// Metadata key prefix of the per-tensor record.
const TENSOR_KEY_PREFIX: &str = "tensor:";

/// How a compressed tensor is stored: independent zstd frames of `chunk_raw_bytes` raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ZstdMeta {
    /// Raw bytes per frame (the last frame may hold fewer).
    pub chunk_raw_bytes: u64,
    /// Stored (compressed) size of each frame, in order.
    pub chunks: Vec<u64>,
}

/// The per-tensor record in `__metadata__` (JSON-encoded into a string).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TensorMeta {
    checksum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flat: Option<FlatSlice>,
    /// Logical dtype and shape when the stored tensor is compressed bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dtype: Option<Dtype>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shape: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zstd: Option<ZstdMeta>,
}

/// The tensor entry safetensors itself reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// One tensor to describe in a header being built.
pub(crate) struct HeaderItem<'a> {
    pub spec: &'a TensorSpec,
    pub stored_bytes: u64,
    pub checksum: u64,
    pub zstd: Option<ZstdMeta>,
}

/// One tensor of a parsed header.
#[derive(Debug, Clone)]
pub(crate) struct HeaderTensor {
    pub name: String,
    pub record: TensorRecord,
    /// Byte range of the stored bytes, relative to the start of the file.
    pub file_range: Range<usize>,
    pub zstd: Option<ZstdMeta>,
}

/// A parsed, validated shard header.
#[derive(Debug, Clone)]
pub(crate) struct ParsedHeader {
    pub meta: ShardMeta,
    pub header_xxh3: String,
    pub file_size: u64,
    pub tensors: BTreeMap<String, HeaderTensor>,
}

impl ParsedHeader {
    /// The record of this shard for a manifest.
    pub fn info(&self, file: &str) -> ShardInfo {
        ShardInfo {
            file: file.to_string(),
            size: self.file_size,
            header_xxh3: self.header_xxh3.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.record.clone()))
                .collect(),
        }
    }
}

/// Builds the full header (8-byte length, JSON, space padding to a multiple of 8). Its length
/// depends only on the shapes and stored sizes, never on the checksum values.
pub(crate) fn build_header(
    meta: &ShardMeta,
    compression: Compression,
    items: &[HeaderItem],
) -> Vec<u8> {
    let mut md = Map::new();
    let mut put = |k: &str, v: String| md.insert(k.to_string(), Value::String(v));
    put("format", FORMAT_NAME.to_string());
    put("format_version", FORMAT_VERSION.to_string());
    put("step", meta.step.to_string());
    put("rank", meta.rank.to_string());
    put("world_size", meta.world_size.to_string());
    put("layout_hash", meta.layout_hash.clone());
    put("checksum_algo", CHECKSUM_ALGO.to_string());
    put("compression", compression.as_metadata());
    let mut root = Map::new();
    let mut offset = 0u64;
    for item in items {
        let compressed = item.zstd.is_some();
        let tm = TensorMeta {
            checksum: to_hex(item.checksum),
            flat: item.spec.flat,
            dtype: compressed.then_some(item.spec.dtype),
            shape: compressed.then(|| item.spec.shape.clone()),
            zstd: item.zstd.clone(),
        };
        let tm = serde_json::to_string(&tm).expect("serializing plain structs cannot fail");
        md.insert(
            format!("{TENSOR_KEY_PREFIX}{}", item.spec.name),
            Value::String(tm),
        );
        let (dtype, shape) = if compressed {
            (Dtype::U8, vec![item.stored_bytes as usize])
        } else {
            (item.spec.dtype, item.spec.shape.clone())
        };
        let entry = SafetensorsEntry {
            dtype: dtype.as_str().to_string(),
            shape,
            data_offsets: [offset, offset + item.stored_bytes],
        };
        offset += item.stored_bytes;
        let entry = serde_json::to_value(entry).expect("serializing plain structs cannot fail");
        root.insert(item.spec.name.clone(), entry);
    }
    root.insert("__metadata__".to_string(), Value::Object(md));
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("a JSON value serializes");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Reads and validates the header of an open shard whose size is `file_size`. Reads with
/// `read`, never maps, so a short or damaged file is an error rather than a SIGBUS.
pub(crate) fn read_header(file: &mut File, path: &Path, file_size: u64) -> Result<ParsedHeader> {
    if file_size < 8 {
        return Err(CheckpointError::corrupt(
            path,
            format!("file is {file_size} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| CheckpointError::io("read header of", path, e))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > HEADER_BYTES_MAX || n > file_size - 8 {
        return Err(CheckpointError::corrupt(
            path,
            format!("header length {n} does not fit in a file of {file_size} bytes (truncated or not a shard)"),
        ));
    }
    let mut bytes = vec![0u8; 8 + n as usize];
    bytes[..8].copy_from_slice(&len_bytes);
    file.read_exact(&mut bytes[8..])
        .map_err(|e| CheckpointError::io("read header of", path, e))?;
    parse_header(&bytes, path, file_size)
}

/// Parses the header bytes (`8 + N` of them) of a shard of `file_size` bytes.
pub(crate) fn parse_header(bytes: &[u8], path: &Path, file_size: u64) -> Result<ParsedHeader> {
    let header_xxh3 = to_hex(xxh3_64(bytes));
    let root: Map<String, Value> = serde_json::from_slice(&bytes[8..])
        .map_err(|e| CheckpointError::corrupt(path, format!("header is not a JSON object: {e}")))?;
    let md = parse_metadata_map(&root, path)?;
    let meta = parse_shard_meta(&md, path)?;
    let mut tensors = BTreeMap::new();
    for (name, entry) in &root {
        if name == "__metadata__" {
            continue;
        }
        let t = parse_tensor(name, entry, &md, bytes.len(), path)?;
        tensors.insert(name.clone(), t);
    }
    check_contiguous(&tensors, bytes.len() as u64, file_size, path)?;
    Ok(ParsedHeader {
        meta,
        header_xxh3,
        file_size,
        tensors,
    })
}

fn parse_metadata_map(root: &Map<String, Value>, path: &Path) -> Result<BTreeMap<String, String>> {
    let Some(Value::Object(md)) = root.get("__metadata__") else {
        return Err(CheckpointError::corrupt(
            path,
            "header has no `__metadata__` object",
        ));
    };
    md.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(CheckpointError::corrupt(
                path,
                format!("metadata `{k}` is not a string"),
            )),
        })
        .collect()
}

fn md_get<'a>(md: &'a BTreeMap<String, String>, key: &str, path: &Path) -> Result<&'a str> {
    md.get(key)
        .map(String::as_str)
        .ok_or_else(|| CheckpointError::corrupt(path, format!("metadata key `{key}` is missing")))
}

fn md_num(md: &BTreeMap<String, String>, key: &str, path: &Path) -> Result<u64> {
    let v = md_get(md, key, path)?;
    v.parse().map_err(|_| {
        CheckpointError::corrupt(path, format!("metadata `{key}` = `{v}` is not a number"))
    })
}

fn parse_shard_meta(md: &BTreeMap<String, String>, path: &Path) -> Result<ShardMeta> {
    let format = md_get(md, "format", path)?;
    if format != FORMAT_NAME {
        return Err(CheckpointError::corrupt(
            path,
            format!("metadata format is `{format}`, not `{FORMAT_NAME}`: not a Lazarus shard"),
        ));
    }
    let version = md_get(md, "format_version", path)?;
    if version != FORMAT_VERSION.to_string() {
        return Err(CheckpointError::corrupt(
            path,
            format!(
                "format_version `{version}` is not supported (this build reads {FORMAT_VERSION})"
            ),
        ));
    }
    let algo = md_get(md, "checksum_algo", path)?;
    if algo != CHECKSUM_ALGO {
        return Err(CheckpointError::corrupt(
            path,
            format!("checksum_algo `{algo}` is not supported (expected {CHECKSUM_ALGO})"),
        ));
    }
    Ok(ShardMeta {
        step: md_num(md, "step", path)?,
        rank: md_num(md, "rank", path)? as usize,
        world_size: md_num(md, "world_size", path)? as usize,
        layout_hash: md_get(md, "layout_hash", path)?.to_string(),
    })
}

fn parse_tensor(
    name: &str,
    entry: &Value,
    md: &BTreeMap<String, String>,
    header_len: usize,
    path: &Path,
) -> Result<HeaderTensor> {
    let bad = |d: String| CheckpointError::corrupt(path, format!("tensor `{name}`: {d}"));
    let e: SafetensorsEntry = serde_json::from_value(entry.clone())
        .map_err(|err| bad(format!("bad header entry: {err}")))?;
    let dtype =
        Dtype::parse(&e.dtype).ok_or_else(|| bad(format!("unsupported dtype `{}`", e.dtype)))?;
    let tm_str = md
        .get(&format!("{TENSOR_KEY_PREFIX}{name}"))
        .ok_or_else(|| bad("no checksum record in metadata".to_string()))?;
    let tm: TensorMeta =
        serde_json::from_str(tm_str).map_err(|err| bad(format!("bad metadata record: {err}")))?;
    if !is_hex16(&tm.checksum) {
        return Err(bad(format!(
            "checksum `{}` is not 16 hex digits",
            tm.checksum
        )));
    }
    let [start, end] = e.data_offsets;
    if end < start {
        return Err(bad(format!("data_offsets [{start}, {end}] are reversed")));
    }
    let stored = end - start;
    let stored_spec = TensorSpec::new(name, dtype, e.shape.clone());
    if stored_spec.byte_len().map(|b| b as u64) != Some(stored) {
        return Err(bad(format!(
            "shape {:?} of {} does not match {stored} stored bytes",
            e.shape, e.dtype
        )));
    }
    let logical = match (&tm.zstd, tm.dtype, &tm.shape) {
        (None, None, None) => TensorSpec {
            flat: tm.flat,
            ..stored_spec
        },
        (Some(z), Some(d), Some(s)) if dtype == Dtype::U8 => {
            let spec = TensorSpec {
                name: name.to_string(),
                dtype: d,
                shape: s.clone(),
                flat: tm.flat,
            };
            check_zstd_table(&spec, z, stored).map_err(bad)?;
            spec
        }
        _ => return Err(bad("inconsistent compression record".to_string())),
    };
    logical.validate().map_err(|err| bad(err.to_string()))?;
    let base = header_len as u64;
    let file_range = usize::try_from(base + start)
        .ok()
        .zip(usize::try_from(base + end).ok());
    let file_range =
        file_range.ok_or_else(|| bad("offsets exceed the address space".to_string()))?;
    Ok(HeaderTensor {
        name: name.to_string(),
        record: TensorRecord {
            dtype: logical.dtype,
            shape: logical.shape,
            flat: logical.flat,
            checksum: tm.checksum,
            stored_bytes: stored,
        },
        file_range: file_range.0..file_range.1,
        zstd: tm.zstd,
    })
}

fn check_zstd_table(
    spec: &TensorSpec,
    z: &ZstdMeta,
    stored: u64,
) -> std::result::Result<(), String> {
    let raw = spec.byte_len().ok_or("logical shape overflows")? as u64;
    if z.chunk_raw_bytes == 0 {
        return Err("zstd chunk size is 0".to_string());
    }
    let want_chunks = raw.div_ceil(z.chunk_raw_bytes);
    if z.chunks.len() as u64 != want_chunks {
        return Err(format!(
            "{} zstd chunks recorded, {want_chunks} expected for {raw} raw bytes",
            z.chunks.len()
        ));
    }
    let sum = z.chunks.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    if sum != Some(stored) {
        return Err(format!(
            "zstd chunk sizes sum to {sum:?}, but {stored} bytes are stored"
        ));
    }
    Ok(())
}

fn check_contiguous(
    tensors: &BTreeMap<String, HeaderTensor>,
    header_len: u64,
    file_size: u64,
    path: &Path,
) -> Result<()> {
    let mut ranges: Vec<(&Range<usize>, &str)> = tensors
        .values()
        .map(|t| (&t.file_range, t.name.as_str()))
        .collect();
    ranges.sort_by_key(|(r, _)| (r.start, r.end));
    let mut at = header_len;
    for (r, name) in ranges {
        if r.start as u64 != at {
            return Err(CheckpointError::corrupt(
                path,
                format!(
                    "tensor `{name}` starts at byte {}, expected {at} (gap or overlap)",
                    r.start
                ),
            ));
        }
        at = r.end as u64;
    }
    if at != file_size {
        return Err(CheckpointError::corrupt(
            path,
            format!(
                "header describes {at} bytes but the file has {file_size} (truncated or extended)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ShardMeta {
        ShardMeta {
            step: 5,
            rank: 1,
            world_size: 2,
            layout_hash: "abc".into(),
        }
    }

    #[test]
    fn header_length_is_independent_of_checksums_and_round_trips() {
        let a = TensorSpec::flat("w", Dtype::F32, 3, 3, 10);
        let b = TensorSpec::new("rng", Dtype::U64, vec![2]);
        let items = |c: u64| {
            vec![
                HeaderItem {
                    spec: &a,
                    stored_bytes: 12,
                    checksum: c,
                    zstd: None,
                },
                HeaderItem {
                    spec: &b,
                    stored_bytes: 16,
                    checksum: c,
                    zstd: None,
                },
            ]
        };
        let h0 = build_header(&meta(), Compression::None, &items(0));
        let h1 = build_header(&meta(), Compression::None, &items(u64::MAX));
        assert_eq!(h0.len(), h1.len());
        assert_eq!(h0.len() % 8, 0);
        let parsed = parse_header(&h1, Path::new("x"), h1.len() as u64 + 28).expect("parses");
        assert_eq!(parsed.meta, meta());
        assert_eq!(parsed.tensors["w"].record.flat, a.flat);
        assert_eq!(
            parsed.tensors["rng"].file_range,
            h1.len() + 12..h1.len() + 28
        );
        let short = parse_header(&h1, Path::new("x"), h1.len() as u64 + 27).unwrap_err();
        assert!(short.to_string().contains("truncated"), "{short}");
    }
}
