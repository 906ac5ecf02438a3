//! Token data: llm.c's shard format (256 little-endian i32 header, then u16 tokens), read
//! through memory maps with validation, and the deterministic loader whose global batch at a
//! step depends only on (seed, step, batch shape).

use crate::error::{Result, TrainError};
use crate::rng::Rng;
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Magic number in header word 0.
pub const SHARD_MAGIC: i32 = 20240520;
/// Format version in header word 1.
pub const SHARD_VERSION: i32 = 1;
/// Header length in bytes (256 i32).
pub const HEADER_BYTES: usize = 256 * 4;
/// GPT-2's end-of-text token, put before every document by `data prepare`.
pub const GPT2_EOT: u16 = 50256;

/// One memory-mapped token file whose header has been checked against its size.
#[derive(Debug)]
pub struct TokenFile {
    pub path: PathBuf,
    map: Mmap,
    /// Number of tokens.
    pub len: usize,
    /// Vocabulary size recorded in header word 3 (a Lazarus extension; 0 there means GPT-2).
    pub vocab: usize,
}

fn data_err(path: &Path, detail: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

impl TokenFile {
    /// Opens and validates a token file: magic, version and token count against the size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| TrainError::io("opening token file", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| TrainError::io("reading metadata of", path, e))?
            .len() as usize;
        if size < HEADER_BYTES {
            return Err(data_err(
                path,
                format!("{size} bytes is shorter than the {HEADER_BYTES}-byte header: truncated or not a token file"),
            ));
        }
        // SAFETY: the size was read above and is at least the header; the map is read-only and
        // Lazarus never writes to data files. A data file truncated by another program while a
        // run is using it is outside what we can protect against (documented in ARCHITECTURE.md).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| TrainError::io("mapping", path, e))?;
        let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        if word(0) != SHARD_MAGIC {
            return Err(data_err(
                path,
                format!("magic {} is not {SHARD_MAGIC}: not an llm.c/Lazarus token file (write one with `lazarus data prepare`)", word(0)),
            ));
        }
        if word(1) != SHARD_VERSION {
            return Err(data_err(
                path,
                format!(
                    "version {} is not supported (expected {SHARD_VERSION}, u16 tokens)",
                    word(1)
                ),
            ));
        }
        let len = word(2);
        let want = HEADER_BYTES as u64 + 2 * len.max(0) as u64;
        if len <= 0 || want != size as u64 {
            return Err(data_err(
                path,
                format!("header says {len} tokens ({want} bytes) but the file has {size} bytes: truncated or damaged"),
            ));
        }
        let vocab = match word(3) {
            0 => crate::config::GPT2_VOCAB,
            v if (1..=65536).contains(&v) => v as usize,
            v => {
                return Err(data_err(
                    path,
                    format!("vocabulary size {v} in header word 3 is out of range"),
                ))
            }
        };
        Ok(TokenFile {
            path: path.to_path_buf(),
            map,
            len: len as usize,
            vocab,
        })
    }

    /// Token `i` (no bounds check beyond the slice's).
    pub fn token(&self, i: usize) -> u16 {
        let o = HEADER_BYTES + 2 * i;
        u16::from_le_bytes([self.map[o], self.map[o + 1]])
    }
}

/// Writes tokens as a token file, atomically (tmp, fsync, rename).
pub fn write_token_file(path: &Path, tokens: &[u16], vocab: usize) -> Result<()> {
    if tokens.is_empty() || tokens.len() > i32::MAX as usize {
        return Err(data_err(
            path,
            format!("cannot write {} tokens to one file", tokens.len()),
        ));
    }
    let mut header = [0i32; 256];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = tokens.len() as i32;
    header[3] = vocab as i32;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    header
        .iter()
        .for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
    tokens
        .iter()
        .for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
    let tmp = path.with_extension("bin.tmp");
    let io = |e| TrainError::io("writing token file", path, e);
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A run of windows in one file: samples are windows of T+1 tokens starting at multiples of T.
#[derive(Debug, Clone, Copy)]
struct Segment {
    file: usize,
    first_window: usize,
    windows: usize,
}

/// The train or validation part of a data source.
#[derive(Debug)]
pub struct Split {
    files: Vec<std::sync::Arc<TokenFile>>,
    segments: Vec<Segment>,
    seq: usize,
    vocab: usize,
    /// Total windows over all segments.
    pub windows: usize,
}

impl Split {
    fn new(
        files: Vec<std::sync::Arc<TokenFile>>,
        segments: Vec<Segment>,
        seq: usize,
        vocab: usize,
    ) -> Self {
        let windows = segments.iter().map(|s| s.windows).sum();
        Split {
            files,
            segments,
            seq,
            vocab,
            windows,
        }
    }

    /// Copies window `w` into `inputs` (T tokens) and `targets` (the next T tokens), checking
    /// every token against the vocabulary.
    pub fn read_window(&self, mut w: usize, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let seg = self
            .segments
            .iter()
            .find(|s| {
                if w < s.windows {
                    true
                } else {
                    w -= s.windows;
                    false
                }
            })
            .expect("window index below Split::windows");
        let f = &self.files[seg.file];
        let start = (seg.first_window + w) * self.seq;
        for i in 0..=self.seq {
            let tok = f.token(start + i) as usize;
            if tok >= self.vocab {
                return Err(data_err(
                    &f.path,
                    format!(
                        "token {tok} at position {} is outside the vocabulary of {}",
                        start + i,
                        self.vocab
                    ),
                ));
            }
            if i < self.seq {
                inputs[i] = tok as u32;
            }
            if i > 0 {
                targets[i - 1] = tok as u32;
            }
        }
        Ok(())
    }
}

/// Train and validation splits of a token file or directory.
#[derive(Debug)]
pub struct DataSource {
    pub train: Split,
    pub val: Split,
    /// Vocabulary of the data (header word 3).
    pub vocab: usize,
    /// Human-readable description for the log.
    pub description: String,
}

fn windows_of(f: &TokenFile, seq: usize) -> usize {
    (f.len.saturating_sub(1)) / seq
}

fn list_dir(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| TrainError::io("listing data directory", dir, e))?;
    let mut bins: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    bins.sort();
    let is = |p: &PathBuf, key: &str| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(key))
    };
    let val: Vec<PathBuf> = bins.iter().filter(|p| is(p, "val")).cloned().collect();
    let train: Vec<PathBuf> = bins.into_iter().filter(|p| !is(p, "val")).collect();
    Ok((train, val))
}

impl DataSource {
    /// Opens `path`: a directory (files with `val` in the name are validation, the other
    /// `.bin` files training) or one file (validation from a sibling with `train` replaced by
    /// `val`, else the last tenth of its windows is held out).
    pub fn open(path: &Path, seq: usize) -> Result<Self> {
        let (train_paths, val_paths) = if path.is_dir() {
            list_dir(path)?
        } else {
            let sib = path
                .file_name()
                .map(|n| n.to_string_lossy().replace("train", "val"));
            let val = sib
                .map(|s| path.with_file_name(s))
                .filter(|p| p != path && p.exists());
            (vec![path.to_path_buf()], val.into_iter().collect())
        };
        if train_paths.is_empty() {
            return Err(data_err(path, "no training token files (*.bin) found; create some with `lazarus data synth` or `lazarus data prepare`"));
        }
        let open_all = |ps: &[PathBuf]| -> Result<Vec<std::sync::Arc<TokenFile>>> {
            ps.iter()
                .map(|p| TokenFile::open(p).map(std::sync::Arc::new))
                .collect()
        };
        let train_files = open_all(&train_paths)?;
        let val_files = open_all(&val_paths)?;
        let vocab = train_files[0].vocab;
        if let Some(f) = train_files
            .iter()
            .chain(&val_files)
            .find(|f| f.vocab != vocab)
        {
            return Err(data_err(
                &f.path,
                format!(
                    "vocabulary {} differs from {}'s {vocab}",
                    f.vocab,
                    train_files[0].path.display()
                ),
            ));
        }
        let segs = |files: &[std::sync::Arc<TokenFile>]| -> Vec<Segment> {
            files
                .iter()
                .enumerate()
                .map(|(i, f)| Segment {
                    file: i,
                    first_window: 0,
                    windows: windows_of(f, seq),
                })
                .collect()
        };
        let mut train_segs = segs(&train_files);
        let (val_files, val_segs) = if val_files.is_empty() {
            // Hold out the tail of the last training file.
            let last = train_segs.last_mut().expect("at least one training file");
            let held = (last.windows / 10)
                .max(1)
                .min(last.windows.saturating_sub(1));
            last.windows -= held;
            let seg = Segment {
                file: 0,
                first_window: last.windows,
                windows: held,
            };
            (vec![train_files[last.file].clone()], vec![seg])
        } else {
            let s = segs(&val_files);
            (val_files, s)
        };
        let train = Split::new(train_files, train_segs, seq, vocab);
        let val = Split::new(val_files, val_segs, seq, vocab);
        if train.windows == 0 || val.windows == 0 {
            return Err(data_err(path, format!("too few tokens for sequence length {seq}: {} training and {} validation windows of {} tokens", train.windows, val.windows, seq + 1)));
        }
        let description = format!(
            "{} ({} train windows, {} val windows of T={seq}, vocab {vocab})",
            path.display(),
            train.windows,
            val.windows
        );
        Ok(DataSource {
            train,
            val,
            vocab,
            description,
        })
    }
}

/// Where the training stream stands: sample `position` of `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

/// The deterministic sampler over a split: global sample `j` is window
/// `perm_{epoch}[j mod windows]` with `epoch = j / windows`, the permutation seeded by
/// (seed, epoch). The stream is thus independent of the world size and of restarts.
#[derive(Debug)]
pub struct Sampler {
    seed: u64,
    windows: usize,
    epoch: Option<u64>,
    perm: Vec<u32>,
}

impl Sampler {
    /// A sampler over `windows` windows.
    pub fn new(seed: u64, windows: usize) -> Self {
        assert!(windows > 0 && windows <= u32::MAX as usize);
        Sampler {
            seed,
            windows,
            epoch: None,
            perm: Vec::with_capacity(windows),
        }
    }

    /// Cursor of global sample `j`.
    pub fn cursor(&self, j: u64) -> Cursor {
        Cursor {
            epoch: j / self.windows as u64,
            position: j % self.windows as u64,
        }
    }

    /// Window index of global sample `j`.
    pub fn window(&mut self, j: u64) -> usize {
        let c = self.cursor(j);
        if self.epoch != Some(c.epoch) {
            self.shuffle(c.epoch);
        }
        self.perm[c.position as usize] as usize
    }

    fn shuffle(&mut self, epoch: u64) {
        self.perm.clear();
        self.perm.extend(0..self.windows as u32);
        let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..self.windows).rev() {
            let k = rng.below(i as u64 + 1) as usize;
            self.perm.swap(i, k);
        }
        self.epoch = Some(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, n: usize, vocab: usize) -> PathBuf {
        let p = dir.join(name);
        let toks: Vec<u16> = (0..n).map(|i| (i % vocab) as u16).collect();
        write_token_file(&p, &toks, vocab).unwrap();
        p
    }

    #[test]
    fn round_trip_and_split() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "x_train.bin", 1001, 256);
        write(d.path(), "x_val.bin", 201, 256);
        let src = DataSource::open(d.path(), 10).unwrap();
        assert_eq!(
            (src.train.windows, src.val.windows, src.vocab),
            (100, 20, 256)
        );
        let (mut i, mut t) = (vec![0; 10], vec![0; 10]);
        src.train.read_window(3, &mut i, &mut t).unwrap();
        assert_eq!(i[0], 30);
        assert_eq!(t[9], 40);
        // A single file without a sibling holds out its tail.
        let solo = write(d.path(), "solo.bin", 1001, 256);
        let src = DataSource::open(&solo, 10).unwrap();
        assert_eq!((src.train.windows, src.val.windows), (90, 10));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t.bin", 100, 256);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
        let e = TokenFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("t.bin"), "{e}");
        std::fs::write(&p, vec![7u8; 4000]).unwrap();
        let e = TokenFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        std::fs::write(&p, b"short").unwrap();
        assert!(TokenFile::open(&p)
            .unwrap_err()
            .to_string()
            .contains("shorter than"));
        let e = DataSource::open(&d.path().join("nope"), 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn out_of_vocab_token_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.bin");
        write_token_file(&p, &[1, 2, 300, 4, 5, 6, 7, 8, 9, 10, 11], 256).unwrap();
        let src = DataSource::open(&p, 4).unwrap();
        let (mut i, mut t) = (vec![0; 4], vec![0; 4]);
        let e = src
            .train
            .read_window(0, &mut i, &mut t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("300"), "{e}");
    }

    #[test]
    fn sampler_is_a_permutation_per_epoch_and_deterministic() {
        let mut a = Sampler::new(5, 50);
        let mut b = Sampler::new(5, 50);
        let e0: Vec<usize> = (0..50).map(|j| a.window(j)).collect();
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        let e1: Vec<usize> = (50..100).map(|j| a.window(j)).collect();
        assert_ne!(e0, e1);
        // Random access gives the same answer as sequential access.
        assert_eq!(b.window(73), e1[23]);
        assert_eq!(b.window(2), e0[2]);
    }
}
