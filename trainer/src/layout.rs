//! The flat parameter layout: every tensor of the model is a named range of one f32 buffer.
//! Gradients and AdamW state use the same layout, so a ZeRO shard is an index range and a
//! checkpoint shard a set of slices.

use crate::config::ModelConfig;
use sha2::{Digest, Sha256};
use std::ops::Range;

/// One tensor of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Hugging Face GPT-2 name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    /// Shape in our orientation: linear weights are (OC, C), i.e. the transpose of HF's Conv1D.
    pub shape: Vec<usize>,
    /// Offset in elements in the flat buffer.
    pub offset: usize,
    /// Whether AdamW applies weight decay (matrices yes; biases and LayerNorm no).
    pub decay: bool,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The tensor's range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Ranges of one transformer block's parameters, in layout order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRanges {
    pub ln1_w: Range<usize>,
    pub ln1_b: Range<usize>,
    pub qkv_w: Range<usize>,
    pub qkv_b: Range<usize>,
    pub attproj_w: Range<usize>,
    pub attproj_b: Range<usize>,
    pub ln2_w: Range<usize>,
    pub ln2_b: Range<usize>,
    pub fc_w: Range<usize>,
    pub fc_b: Range<usize>,
    pub fcproj_w: Range<usize>,
    pub fcproj_b: Range<usize>,
}

impl BlockRanges {
    /// The ranges in layout order.
    pub fn in_order(&self) -> [Range<usize>; 12] {
        [
            self.ln1_w.clone(),
            self.ln1_b.clone(),
            self.qkv_w.clone(),
            self.qkv_b.clone(),
            self.attproj_w.clone(),
            self.attproj_b.clone(),
            self.ln2_w.clone(),
            self.ln2_b.clone(),
            self.fc_w.clone(),
            self.fc_b.clone(),
            self.fcproj_w.clone(),
            self.fcproj_b.clone(),
        ]
    }
    /// The whole block's span.
    pub fn span(&self) -> Range<usize> {
        self.ln1_w.start..self.fcproj_b.end
    }
}

/// The table of all tensors plus the ranges the model code uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub tensors: Vec<TensorInfo>,
    /// Total number of parameters.
    pub total: usize,
    pub wte: Range<usize>,
    pub wpe: Range<usize>,
    pub blocks: Vec<BlockRanges>,
    pub lnf_w: Range<usize>,
    pub lnf_b: Range<usize>,
}

struct Builder {
    tensors: Vec<TensorInfo>,
    offset: usize,
}

impl Builder {
    fn push(&mut self, name: String, shape: &[usize]) -> Range<usize> {
        let info = TensorInfo {
            name,
            shape: shape.to_vec(),
            offset: self.offset,
            decay: shape.len() >= 2,
        };
        let r = info.range();
        self.offset = r.end;
        self.tensors.push(info);
        r
    }
}

impl Layout {
    /// The GPT-2 layout for `m`, in Hugging Face order and names.
    pub fn gpt2(m: &ModelConfig) -> Layout {
        let (c, vp) = (m.channels, m.padded_vocab);
        let mut b = Builder {
            tensors: Vec::new(),
            offset: 0,
        };
        let wte = b.push("wte.weight".into(), &[vp, c]);
        let wpe = b.push("wpe.weight".into(), &[m.block_size, c]);
        let blocks = (0..m.layers)
            .map(|l| {
                let mut p =
                    |suffix: &str, shape: &[usize]| b.push(format!("h.{l}.{suffix}"), shape);
                BlockRanges {
                    ln1_w: p("ln_1.weight", &[c]),
                    ln1_b: p("ln_1.bias", &[c]),
                    qkv_w: p("attn.c_attn.weight", &[3 * c, c]),
                    qkv_b: p("attn.c_attn.bias", &[3 * c]),
                    attproj_w: p("attn.c_proj.weight", &[c, c]),
                    attproj_b: p("attn.c_proj.bias", &[c]),
                    ln2_w: p("ln_2.weight", &[c]),
                    ln2_b: p("ln_2.bias", &[c]),
                    fc_w: p("mlp.c_fc.weight", &[4 * c, c]),
                    fc_b: p("mlp.c_fc.bias", &[4 * c]),
                    fcproj_w: p("mlp.c_proj.weight", &[c, 4 * c]),
                    fcproj_b: p("mlp.c_proj.bias", &[c]),
                }
            })
            .collect();
        let lnf_w = b.push("ln_f.weight".into(), &[c]);
        let lnf_b = b.push("ln_f.bias".into(), &[c]);
        Layout {
            tensors: b.tensors,
            total: b.offset,
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A short hash of names, shapes and offsets: two layouts with the same hash are
    /// interchangeable in a checkpoint.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for t in &self.tensors {
            h.update(t.name.as_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update((t.offset as u64).to_le_bytes());
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Splits `buf` into disjoint mutable slices for sorted, non-overlapping `ranges`.
pub fn split_ranges_mut<'a>(mut buf: &'a mut [f32], ranges: &[Range<usize>]) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut consumed = 0;
    for r in ranges {
        assert!(r.start >= consumed, "ranges must be sorted and disjoint");
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(r.start - consumed);
        let (piece, rest) = rest.split_at_mut(r.len());
        out.push(piece);
        buf = rest;
        consumed = r.end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d2() -> ModelConfig {
        ModelConfig {
            layers: 2,
            heads: 4,
            channels: 128,
            vocab: 256,
            padded_vocab: 256,
            block_size: 64,
        }
    }

    #[test]
    fn layout_is_contiguous_and_named_like_hf() {
        let l = Layout::gpt2(&d2());
        let mut off = 0;
        for t in &l.tensors {
            assert_eq!(t.offset, off, "{} not contiguous", t.name);
            off += t.numel();
        }
        assert_eq!(off, l.total);
        assert_eq!(
            l.get("h.1.attn.c_attn.weight").unwrap().shape,
            vec![384, 128]
        );
        assert!(l.get("h.0.mlp.c_proj.bias").is_some());
        assert!(!l.get("ln_f.bias").unwrap().decay);
        assert!(l.get("wte.weight").unwrap().decay);
        assert_eq!(l.blocks[1].span().end, l.lnf_w.start);
    }

    #[test]
    fn hash_changes_with_shape() {
        let a = Layout::gpt2(&d2());
        let b = Layout::gpt2(&ModelConfig { layers: 3, ..d2() });
        assert_eq!(a.hash(), Layout::gpt2(&d2()).hash());
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn split_ranges_gives_disjoint_views() {
        let mut v: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let parts = split_ranges_mut(&mut v, &[1..3, 3..4, 7..10]);
        assert_eq!(parts[0], &[1.0, 2.0]);
        assert_eq!(parts[1], &[3.0]);
        assert_eq!(parts[2], &[7.0, 8.0, 9.0]);
    }
}
