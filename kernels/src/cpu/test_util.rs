//! Helpers shared by the CPU kernel tests: a deterministic RNG, central finite differences,
//! and comparisons with stated tolerances.

/// Step of the central differences.
const H: f64 = 1e-6;

/// Tolerance of analytic against finite-difference gradients in f64, relative with a floor of 1
/// (`|got - want| <= GRAD_TOL * max(1, |got|, |want|)`). With h = 1e-6 the truncation error is
/// about 1e-12 and the rounding error about 1e-16 * |L| / h, below 1e-9 for these objectives.
pub const GRAD_TOL: f64 = 1e-6;

/// Tolerance of an f32 forward against the f64 forward, relative with a floor of 1.
pub const F32_TOL: f64 = 1e-5;

/// The value gradient buffers start from in the accumulation checks.
pub const PREFILL: f64 = 0.5;

/// Tolerance of the accumulation checks, relative with a floor of 1: adding PREFILL may round
/// differently from adding the gradient to zero, and nothing else.
const ACCUMULATE_TOL: f64 = 1e-12;

/// splitmix64, a small deterministic generator, so tests need no `rand` crate.
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// `len` uniform values in [-1, 1).
    pub fn vec(&mut self, len: usize) -> Vec<f64> {
        (0..len).map(|_| self.uniform()).collect()
    }

    /// `len` uniform values in [-1, 1), as f32.
    pub fn vec_f32(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform() as f32).collect()
    }
}

/// Rounds every value to f32.
pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Dot product, the objective `L = Σ out ⊙ R` of the gradient checks.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The gradient of `loss` at `x` by central differences, one element at a time.
pub fn numeric_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let original = probe[i];
            probe[i] = original + H;
            let plus = loss(&probe);
            probe[i] = original - H;
            let minus = loss(&probe);
            probe[i] = original;
            (plus - minus) / (2.0 * H)
        })
        .collect()
}

/// Asserts `|got - want| <= tol * max(1, |got|, |want|)` element by element.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = tol * g.abs().max(w.abs()).max(1.0);
        assert!(
            (g - w).abs() <= bound,
            "{what}[{i}]: got {g}, want {w} (tolerance {bound:e})"
        );
    }
}

/// Asserts that a backward started from PREFILL produced PREFILL plus what it produced from 0.
pub fn assert_accumulated(what: &str, from_zero: &[f64], from_prefill: &[f64]) {
    let want: Vec<f64> = from_zero.iter().map(|g| g + PREFILL).collect();
    assert_close(
        &format!("{what} (accumulated)"),
        from_prefill,
        &want,
        ACCUMULATE_TOL,
    );
}
