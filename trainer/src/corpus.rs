//! Making token files: `data synth` (a deterministic synthetic corpus a small model can learn)
//! and `data prepare` (tokenise a local text file with GPT-2 BPE or as bytes).

use crate::data::{write_token_file, GPT2_EOT};
use crate::error::{Result, TrainError};
use crate::rng::Rng;
use std::path::{Path, PathBuf};

const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "fox", "horse", "child", "farmer", "queen", "river", "garden", "tower",
    "engine", "lamp", "ship", "wolf", "teacher", "robot", "storm", "apple", "stone",
];
const VERBS: &[(&str, &str)] = &[
    ("sees", "see"),
    ("likes", "like"),
    ("finds", "find"),
    ("follows", "follow"),
    ("carries", "carry"),
    ("paints", "paint"),
    ("guards", "guard"),
    ("feeds", "feed"),
    ("watches", "watch"),
    ("builds", "build"),
    ("greets", "greet"),
    ("chases", "chase"),
];
const ADJECTIVES: &[&str] = &[
    "red", "small", "old", "quiet", "bright", "green", "brave", "tired", "happy", "golden", "cold",
    "wild",
];
const PREPOSITIONS: &[&str] = &["near", "under", "behind", "beside", "over", "inside"];
const DETERMINERS: &[&str] = &["the", "a", "my", "one"];

/// Picks index i with probability proportional to 1/(i+1): a Zipf-like skew, so the unigram
/// distribution is uneven as in real text.
fn zipf(rng: &mut Rng, n: usize) -> usize {
    let total: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
    let mut x = rng.uniform() * total;
    for i in 0..n {
        x -= 1.0 / (i + 1) as f64;
        if x <= 0.0 {
            return i;
        }
    }
    n - 1
}

fn noun_phrase(rng: &mut Rng, out: &mut String) -> bool {
    let plural = rng.below(3) == 0;
    if plural {
        out.push_str(["the", "some", "two"][rng.below(3) as usize]);
    } else {
        out.push_str(DETERMINERS[zipf(rng, DETERMINERS.len())]);
    }
    if rng.below(2) == 0 {
        out.push(' ');
        out.push_str(ADJECTIVES[zipf(rng, ADJECTIVES.len())]);
    }
    out.push(' ');
    out.push_str(NOUNS[zipf(rng, NOUNS.len())]);
    if plural {
        out.push('s');
    }
    plural
}

/// One sentence. The verb agrees with the subject's number, a dependency the model must
/// learn across the adjective and noun in between.
pub fn sentence(rng: &mut Rng, out: &mut String) {
    let start = out.len();
    let plural = noun_phrase(rng, out);
    let (sing, plur) = VERBS[zipf(rng, VERBS.len())];
    out.push(' ');
    out.push_str(if plural { plur } else { sing });
    out.push(' ');
    noun_phrase(rng, out);
    if rng.below(3) == 0 {
        out.push(' ');
        out.push_str(PREPOSITIONS[zipf(rng, PREPOSITIONS.len())]);
        out.push(' ');
        noun_phrase(rng, out);
    }
    out.push_str(".\n");
    // Capitalise the first letter, as text would.
    let first = out[start..start + 1].to_ascii_uppercase();
    out.replace_range(start..start + 1, &first);
}

/// The synthetic corpus: `bytes` bytes of sentences from `seed`.
pub fn synth_text(seed: u64, bytes: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut s = String::with_capacity(bytes + 128);
    while s.len() < bytes {
        sentence(&mut rng, &mut s);
    }
    s.truncate(bytes);
    s
}

/// Byte-level tokens (vocabulary 256).
pub fn byte_tokens(text: &str) -> Vec<u16> {
    text.bytes().map(u16::from).collect()
}

/// GPT-2 BPE tokens, with `<|endoftext|>` in front as llm.c does for each document.
pub fn gpt2_tokens(text: &str) -> Vec<u16> {
    let bpe = tiktoken_rs::r50k_base_singleton();
    let mut toks = vec![GPT2_EOT];
    toks.extend(bpe.encode_ordinary(text).into_iter().map(|t| t as u16));
    toks
}

/// Decodes tokens back to text for `sample`.
pub fn decode(tokens: &[u32], vocab: usize) -> String {
    if vocab <= 256 {
        let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        let bpe = tiktoken_rs::r50k_base_singleton();
        match bpe.decode_bytes(tokens) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => format!("{tokens:?}"),
        }
    }
}

/// Encodes a prompt with the tokenizer matching `vocab`.
pub fn encode(text: &str, vocab: usize) -> Vec<u32> {
    if vocab <= 256 {
        text.bytes().map(u32::from).collect()
    } else {
        tiktoken_rs::r50k_base_singleton().encode_ordinary(text)
    }
}

/// Splits tokens into train and validation files `<name>_train_000000.bin` and
/// `<name>_val_000000.bin` in `out`; the last `val_frac` of the tokens is validation.
pub fn write_split(
    out: &Path,
    name: &str,
    tokens: &[u16],
    vocab: usize,
    val_frac: f64,
) -> Result<(PathBuf, PathBuf)> {
    if !(0.0..1.0).contains(&val_frac) || val_frac == 0.0 {
        return Err(TrainError::Config(format!(
            "val fraction {val_frac} must lie in (0, 1)"
        )));
    }
    let n_val = ((tokens.len() as f64 * val_frac) as usize).max(2);
    if tokens.len() < n_val + 2 {
        return Err(TrainError::Config(format!(
            "only {} tokens: too few to split into train and validation",
            tokens.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io("creating data directory", out, e))?;
    let train = out.join(format!("{name}_train_000000.bin"));
    let val = out.join(format!("{name}_val_000000.bin"));
    let cut = tokens.len() - n_val;
    write_token_file(&train, &tokens[..cut], vocab)?;
    write_token_file(&val, &tokens[cut..], vocab)?;
    Ok((train, val))
}

/// `data synth`: writes the synthetic corpus (byte-level) into `out`.
pub fn synth(out: &Path, seed: u64, bytes: usize) -> Result<(PathBuf, PathBuf)> {
    let text = synth_text(seed, bytes);
    write_split(out, "synth", &byte_tokens(&text), 256, 0.05)
}

/// Which tokenizer `data prepare` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    Gpt2,
    Bytes,
}

/// `data prepare`: tokenises a text file into train/val token files in `out`.
pub fn prepare(
    text_path: &Path,
    tokenizer: Tokenizer,
    out: &Path,
    val_frac: f64,
) -> Result<(PathBuf, PathBuf, usize)> {
    let raw =
        std::fs::read(text_path).map_err(|e| TrainError::io("reading text file", text_path, e))?;
    let text = String::from_utf8_lossy(&raw);
    let (tokens, vocab) = match tokenizer {
        Tokenizer::Gpt2 => (gpt2_tokens(&text), crate::config::GPT2_VOCAB),
        Tokenizer::Bytes => (raw.iter().map(|&b| u16::from(b)).collect(), 256),
    };
    let name = text_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "text".into());
    let (a, b) = write_split(out, &name, &tokens, vocab, val_frac)?;
    Ok((a, b, tokens.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entropy_nats(counts: &[usize]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n as f64;
                -p * p.ln()
            })
            .sum()
    }

    #[test]
    fn synth_is_deterministic_and_structured() {
        let a = synth_text(1, 100_000);
        assert_eq!(a, synth_text(1, 100_000));
        assert_ne!(a, synth_text(2, 100_000));
        // Unigram entropy is far below ln 256 and bigram conditional entropy below unigram:
        // there is structure to learn.
        let mut uni = vec![0usize; 256];
        let mut bi = vec![0usize; 256 * 256];
        let b = a.as_bytes();
        for w in b.windows(2) {
            uni[w[0] as usize] += 1;
            bi[w[0] as usize * 256 + w[1] as usize] += 1;
        }
        let h1 = entropy_nats(&uni);
        let h2 = entropy_nats(&bi) - h1;
        assert!(h1 < 3.2, "unigram entropy {h1}");
        assert!(h2 < h1 * 0.6, "bigram conditional {h2} vs unigram {h1}");
    }

    #[test]
    fn gpt2_tokenizer_round_trips() {
        let toks = gpt2_tokens("Hello world");
        assert_eq!(toks, vec![50256, 15496, 995]);
        let ids: Vec<u32> = toks[1..].iter().map(|&t| t as u32).collect();
        assert_eq!(decode(&ids, 50257), "Hello world");
    }
}
