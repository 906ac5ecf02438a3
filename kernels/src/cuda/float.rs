//! [`GpuFloat`], the element types the CUDA activation kernels run in (f32 and bf16), and the
//! names of their kernel entry points.

use cudarc::cublaslt::sys::cudaDataType;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::bf16;

/// An element type of the activation-type kernels: `f32`, or `bf16` (stored in 16 bits,
/// computed and accumulated in f32). Sealed: the kernels exist for these two types only.
pub trait GpuFloat:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + 'static
{
    /// The suffix of this type's kernel entry points: `f32` or `bf16`.
    const SUFFIX: &'static str;

    /// Converts from f32, rounding to nearest (ties to even) where `Self` is narrower.
    fn from_f32(x: f32) -> Self;

    /// Converts to f32 (exact for both types).
    fn to_f32(self) -> f32;
}

pub(crate) mod sealed {
    use super::cudaDataType;

    /// Kernel entry points of the ops that exist for every [`super::GpuFloat`] type.
    #[derive(Debug, Clone, Copy)]
    pub struct Entries {
        pub encoder_forward: &'static str,
        pub encoder_wte_backward: &'static str,
        pub encoder_wpe_backward: &'static str,
        pub layernorm_forward: &'static str,
        pub layernorm_inp_backward: &'static str,
        pub layernorm_params_backward: &'static str,
        pub matmul_bias_forward: &'static str,
        pub matmul_bias_backward: &'static str,
        pub attention_softmax_forward: &'static str,
        pub attention_values_forward: &'static str,
        pub attention_scores_backward: &'static str,
        pub attention_qkv_backward: &'static str,
        pub gelu_forward: &'static str,
        pub gelu_backward: &'static str,
        pub residual_forward: &'static str,
        pub residual_backward: &'static str,
        pub softmax_forward: &'static str,
        pub softmax_crossentropy_forward: &'static str,
        pub softmax_crossentropy_backward: &'static str,
    }

    impl Entries {
        /// Every name, for the check that the sources define them all.
        pub fn all(&self) -> [&'static str; 19] {
            [
                self.encoder_forward,
                self.encoder_wte_backward,
                self.encoder_wpe_backward,
                self.layernorm_forward,
                self.layernorm_inp_backward,
                self.layernorm_params_backward,
                self.matmul_bias_forward,
                self.matmul_bias_backward,
                self.attention_softmax_forward,
                self.attention_values_forward,
                self.attention_scores_backward,
                self.attention_qkv_backward,
                self.gelu_forward,
                self.gelu_backward,
                self.residual_forward,
                self.residual_backward,
                self.softmax_forward,
                self.softmax_crossentropy_forward,
                self.softmax_crossentropy_backward,
            ]
        }
    }

    /// Builds the entry-point names of one type suffix at compile time, so a launch never
    /// formats a string.
    macro_rules! entries {
        ($suffix:literal) => {
            Entries {
                encoder_forward: concat!("encoder_forward_", $suffix),
                encoder_wte_backward: concat!("encoder_wte_backward_", $suffix),
                encoder_wpe_backward: concat!("encoder_wpe_backward_", $suffix),
                layernorm_forward: concat!("layernorm_forward_", $suffix),
                layernorm_inp_backward: concat!("layernorm_inp_backward_", $suffix),
                layernorm_params_backward: concat!("layernorm_params_backward_", $suffix),
                matmul_bias_forward: concat!("matmul_bias_forward_", $suffix),
                matmul_bias_backward: concat!("matmul_bias_backward_", $suffix),
                attention_softmax_forward: concat!("attention_softmax_forward_", $suffix),
                attention_values_forward: concat!("attention_values_forward_", $suffix),
                attention_scores_backward: concat!("attention_scores_backward_", $suffix),
                attention_qkv_backward: concat!("attention_qkv_backward_", $suffix),
                gelu_forward: concat!("gelu_forward_", $suffix),
                gelu_backward: concat!("gelu_backward_", $suffix),
                residual_forward: concat!("residual_forward_", $suffix),
                residual_backward: concat!("residual_backward_", $suffix),
                softmax_forward: concat!("softmax_forward_", $suffix),
                softmax_crossentropy_forward: concat!("softmax_crossentropy_forward_", $suffix),
                softmax_crossentropy_backward: concat!("softmax_crossentropy_backward_", $suffix),
            }
        };
    }

    pub const F32_ENTRIES: Entries = entries!("f32");
    pub const BF16_ENTRIES: Entries = entries!("bf16");

    /// What the backend needs to know about an element type; outside the crate it cannot be
    /// named, which seals [`super::GpuFloat`].
    pub trait Sealed {
        /// The entry points of this type's kernels.
        const ENTRIES: Entries;
        /// The cuBLASLt data type of matrices of this type.
        const BLAS_TYPE: cudaDataType;
    }
}

/// Entry points of the f32-only kernels (optimizer, norm, casts).
pub(crate) mod f32_only {
    pub const ADAMW_UPDATE: &str = "adamw_update_f32";
    pub const GLOBAL_NORM_SQUARED: &str = "global_norm_squared_f32";
    pub const SCALE: &str = "scale_f32";
    pub const CAST_F32_TO_BF16: &str = "cast_f32_to_bf16";
    pub const CAST_BF16_TO_F32: &str = "cast_bf16_to_f32";
    #[cfg(test)]
    pub const ALL: [&str; 5] = [
        ADAMW_UPDATE,
        GLOBAL_NORM_SQUARED,
        SCALE,
        CAST_F32_TO_BF16,
        CAST_BF16_TO_F32,
    ];
}

impl sealed::Sealed for f32 {
    const ENTRIES: sealed::Entries = sealed::F32_ENTRIES;
    const BLAS_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

impl GpuFloat for f32 {
    const SUFFIX: &'static str = "f32";

    fn from_f32(x: f32) -> Self {
        x
    }

    fn to_f32(self) -> f32 {
        self
    }
}

impl sealed::Sealed for bf16 {
    const ENTRIES: sealed::Entries = sealed::BF16_ENTRIES;
    const BLAS_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

impl GpuFloat for bf16 {
    const SUFFIX: &'static str = "bf16";

    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }

    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

#[cfg(test)]
mod tests {
    use super::sealed::Sealed;
    use super::*;

    #[test]
    fn entry_names_carry_their_type_suffix() {
        for name in <f32 as Sealed>::ENTRIES.all() {
            assert!(name.ends_with("_f32"), "{name}");
        }
        for name in <bf16 as Sealed>::ENTRIES.all() {
            assert!(name.ends_with("_bf16"), "{name}");
        }
    }
}
