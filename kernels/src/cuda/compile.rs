//! NVRTC compilation of the kernel sources (`kernels/cuda/*.cu`, embedded in the binary) into
//! cubins for one GPU architecture, with an on-disk cache. Needs libnvrtc but no GPU, so the
//! sources are checked on machines without one.
//!
//! Each `.cu` file is its own NVRTC program (errors then name the file and line) and becomes
//! one CUDA module; `common.cuh` reaches them through NVRTC's in-memory headers. A cache entry
//! is keyed by SHA-256 of everything that shapes the cubin: the sources, the options, the
//! architecture and the NVRTC version.

use crate::KernelError;
use cudarc::nvrtc::{result, sys};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Threads per block of the row kernels (one block per row) and of the element-wise kernels.
/// Passed to the sources as `-DLZ_ROW_THREADS`; a power of two.
pub(crate) const ROW_THREADS: u32 = 256;
/// Columns per block of the column reductions (`-DLZ_COL_TILE`).
pub(crate) const COL_TILE: u32 = 32;
/// Row lanes per block of the column reductions (`-DLZ_COL_LANES`); a power of two.
pub(crate) const COL_LANES: u32 = 16;

/// One file of `kernels/cuda/`.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// The file name, e.g. `layernorm.cu`.
    pub name: &'static str,
    /// The file's text.
    pub text: &'static str,
}

macro_rules! source {
    ($name:literal) => {
        Source {
            name: $name,
            text: include_str!(concat!("../../cuda/", $name)),
        }
    };
}

/// The header every source includes.
const COMMON: Source = source!("common.cuh");

/// Every kernel source, one per op family.
pub const SOURCES: [Source; 8] = [
    source!("encoder.cu"),
    source!("layernorm.cu"),
    source!("attention.cu"),
    source!("softmax.cu"),
    source!("pointwise.cu"),
    source!("optimizer.cu"),
    source!("matmul.cu"),
    source!("cast.cu"),
];

/// The first bytes of a cache file; the SHA-256 of the cubin follows, then the cubin.
const CACHE_MAGIC: &[u8; 8] = b"LZCUBIN1";

/// The kernels of one source file, compiled for one architecture.
#[derive(Debug, Clone)]
pub struct CompiledModule {
    /// The source file's name.
    pub name: &'static str,
    /// The cubin: an ELF image the driver loads as a module.
    pub cubin: Vec<u8>,
    /// The `extern "C" __global__` functions of the source.
    pub entry_points: Vec<&'static str>,
    /// NVRTC's log of a successful compile (warnings); empty when clean or read from the cache.
    pub log: String,
    /// Whether the cubin came from the disk cache.
    pub from_cache: bool,
}

/// Every kernel source compiled for one architecture.
#[derive(Debug, Clone)]
pub struct CompiledKernels {
    /// The architecture, e.g. `sm_90`.
    pub arch: String,
    /// One module per entry of [`SOURCES`], in that order.
    pub modules: Vec<CompiledModule>,
    /// Problems with the cache (unreadable, damaged or unwritable entries). None of them stops
    /// the compile; the caller decides whether to report them.
    pub warnings: Vec<String>,
}

/// Whether NVRTC (`libnvrtc.so`) can be opened.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library; no NVRTC call is made.
    unsafe { sys::is_culib_present() }
}

/// The (major, minor) version of the NVRTC library that is loaded.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    require_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for one write each; the library is present.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Cuda(format!("asking NVRTC for its version: {e:?}")))?;
    Ok((major, minor))
}

/// The kernel cache directory: `$LAZARUS_KERNEL_CACHE`, else `$XDG_CACHE_HOME/lazarus/kernels`,
/// else `$HOME/.cache/lazarus/kernels`; `None` when none of them is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("LAZARUS_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("lazarus").join("kernels"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache/lazarus/kernels"))
}

/// The names of the `extern "C" __global__ void` functions defined in `source`, in order.
pub fn entry_points(source: &str) -> Vec<&str> {
    const MARK: &str = "extern \"C\" __global__ void";
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(MARK) {
        let after = rest[at + MARK.len()..].trim_start();
        let len = after
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(after.len());
        names.push(&after[..len]);
        rest = &after[len..];
    }
    names
}

/// Compiles every source for `arch` (e.g. `sm_90`), reading and filling the cache in
/// `cache_dir` when one is given. Sources compile in parallel.
///
/// Errors: NVRTC missing or failing, or a source that does not compile
/// ([`KernelError::Compile`] with NVRTC's log). Cache trouble is never an error: an unreadable
/// or damaged entry is compiled again and an unwritable directory only loses the cache; both
/// end up in [`CompiledKernels::warnings`].
pub fn compile_kernels(
    arch: &str,
    cache_dir: Option<&Path>,
) -> Result<CompiledKernels, KernelError> {
    check_arch(arch)?;
    let version = nvrtc_version()?;
    let options = options(arch);
    let results: Vec<Result<(CompiledModule, Vec<String>), KernelError>> = SOURCES
        .par_iter()
        .map(|source| compile_cached(source, arch, version, &options, cache_dir))
        .collect();
    let mut modules = Vec::with_capacity(SOURCES.len());
    let mut warnings = Vec::new();
    for result in results {
        let (module, module_warnings) = result?;
        modules.push(module);
        warnings.extend(module_warnings);
    }
    Ok(CompiledKernels {
        arch: arch.to_string(),
        modules,
        warnings,
    })
}

/// Refuses an architecture that is not `sm_` followed by digits and an optional letter (it
/// becomes part of a file name).
fn check_arch(arch: &str) -> Result<(), KernelError> {
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    let digits = digits
        .strip_suffix(|ch: char| ch.is_ascii_lowercase())
        .unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KernelError::Compile {
            arch: arch.to_string(),
            log: "not an NVRTC real architecture: expected sm_ and digits, e.g. sm_90".into(),
        });
    }
    Ok(())
}

/// The NVRTC options: the target, the language, and the launch constants the Rust side uses.
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--generate-line-info".into(),
        format!("-DLZ_ROW_THREADS={ROW_THREADS}"),
        format!("-DLZ_COL_TILE={COL_TILE}"),
        format!("-DLZ_COL_LANES={COL_LANES}"),
    ]
}

fn require_nvrtc() -> Result<(), KernelError> {
    if nvrtc_present() {
        return Ok(());
    }
    Err(KernelError::CudaUnavailable(
        "NVRTC (libnvrtc.so.13) was not found: install the CUDA 13 runtime compiler (the \
         nvidia-cuda-nvrtc wheel or the CUDA toolkit) and put its lib directory on \
         LD_LIBRARY_PATH"
            .into(),
    ))
}

/// One source: from the cache when a valid entry exists, else compiled (and cached).
fn compile_cached(
    source: &Source,
    arch: &str,
    version: (i32, i32),
    options: &[String],
    cache_dir: Option<&Path>,
) -> Result<(CompiledModule, Vec<String>), KernelError> {
    let mut warnings = Vec::new();
    let entry_points = entry_points(source.text);
    let path = cache_dir.map(|dir| dir.join(cache_file_name(source, arch, version, options)));
    if let Some(path) = &path {
        match read_cached(path) {
            Ok(Some(cubin)) => {
                let module = CompiledModule {
                    name: source.name,
                    cubin,
                    entry_points,
                    log: String::new(),
                    from_cache: true,
                };
                return Ok((module, warnings));
            }
            Ok(None) => {}
            Err(warning) => warnings.push(warning),
        }
    }
    let (cubin, log) = compile_source(source, arch, options)?;
    if let Some(path) = &path {
        if let Err(warning) = write_cached(path, &cubin) {
            warnings.push(warning);
        }
    }
    let module = CompiledModule {
        name: source.name,
        cubin,
        entry_points,
        log,
        from_cache: false,
    };
    Ok((module, warnings))
}

/// `<stem>-<arch>-<first 128 bits of the key in hex>.cubin`.
fn cache_file_name(source: &Source, arch: &str, version: (i32, i32), options: &[String]) -> String {
    let mut h = Sha256::new();
    let version = format!("{}.{}", version.0, version.1);
    let mut parts: Vec<&[u8]> = vec![
        b"lazarus-kernel-cache-v1",
        arch.as_bytes(),
        version.as_bytes(),
        source.name.as_bytes(),
        source.text.as_bytes(),
        COMMON.text.as_bytes(),
    ];
    parts.extend(options.iter().map(|o| o.as_bytes()));
    // Length prefixes keep the parts from running into each other.
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let key: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem = source.name.trim_end_matches(".cu");
    format!("{stem}-{arch}-{key}.cubin")
}

/// A cache entry's cubin; `Ok(None)` when there is none; `Err` (a warning) when it cannot be
/// read or fails its checksum, in which case the caller compiles and overwrites it.
fn read_cached(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        // No entry, or no cache directory yet (a file in its place is the writer's problem).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(format!(
                "cannot read the cached kernel {}: {e}; compiling it again",
                path.display()
            ))
        }
    };
    let header = CACHE_MAGIC.len() + 32;
    let valid = bytes.len() > header
        && bytes.starts_with(CACHE_MAGIC)
        && Sha256::digest(&bytes[header..])[..] == bytes[CACHE_MAGIC.len()..header];
    if !valid {
        return Err(format!(
            "the cached kernel {} is damaged; compiling it again",
            path.display()
        ));
    }
    Ok(Some(bytes[header..].to_vec()))
}

/// Distinguishes the temporary files of concurrent writers within one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes a cache entry atomically (a temporary file in the same directory, then rename), so a
/// reader sees the old entry, the new one, or none, never a partial one. `Err` is a warning.
fn write_cached(path: &Path, cubin: &[u8]) -> Result<(), String> {
    let warn = |what: &str, e: std::io::Error| {
        format!(
            "cannot {what} the kernel cache entry {} ({e}); the kernels will be compiled again \
             next time (set LAZARUS_KERNEL_CACHE to a writable directory)",
            path.display()
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| warn("create the directory of", e))?;
    }
    let mut bytes = Vec::with_capacity(CACHE_MAGIC.len() + 32 + cubin.len());
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&Sha256::digest(cubin));
    bytes.extend_from_slice(cubin);
    let unique = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{unique}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        // The temporary file may not exist; nothing else to do about a failed removal.
        let _ = std::fs::remove_file(&tmp);
        warn("write", e)
    })
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program came from nvrtcCreateProgram and is destroyed only here. A failed
        // destroy leaks a little host memory; there is nothing better to do in a drop.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// Compiles one source; returns its cubin and NVRTC's log (warnings, usually empty).
fn compile_source(
    source: &Source,
    arch: &str,
    options: &[String],
) -> Result<(Vec<u8>, String), KernelError> {
    let failed = |what: &str, e: result::NvrtcError| {
        KernelError::Cuda(format!("NVRTC failed {what} {}: {e:?}", source.name))
    };
    // The sources are ours and contain no NUL; a NUL would be a bug in this crate.
    let c_string = |text: &str| CString::new(text).expect("kernel sources contain no NUL byte");
    let (text, name) = (c_string(source.text), c_string(source.name));
    let (header, header_name) = (c_string(COMMON.text), c_string(COMMON.name));
    let headers: [*const c_char; 1] = [header.as_ptr()];
    let include_names: [*const c_char; 1] = [header_name.as_ptr()];
    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string, or an array of one such pointer, that
    // lives until the end of this function, after `program` (declared later) is destroyed.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            text.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            include_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| failed("to create a program for", e))?;
    let program = Program(raw);
    // SAFETY: `program` is a live program created above.
    let compiled = unsafe { result::compile_program(program.0, options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(program.0) }
        .map(|log| c_chars_to_string(&log))
        .map_err(|e| failed("to return the log of", e))?;
    if let Err(e) = compiled {
        // An invalid option (an architecture this NVRTC does not know) may leave no log.
        let log = if log.trim().is_empty() {
            format!("NVRTC returned {e:?} for {} without a log", source.name)
        } else {
            log
        };
        return Err(KernelError::Compile {
            arch: arch.to_string(),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: `program` compiled successfully; `size` is valid for one write.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| failed("to size the cubin of", e))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has the `size` bytes NVRTC asked for.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| failed("to return the cubin of", e))?;
    Ok((cubin, log.trim().to_string()))
}

/// NVRTC's NUL-terminated log as a string.
fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&ch| ch != 0)
        .map(|&ch| ch as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    //! The sources against NVRTC (no GPU needed) and the cache's behaviour.

    use super::*;
    use crate::cuda::float::{f32_only, sealed::Sealed};
    use half::bf16;
    use std::collections::BTreeSet;

    /// Whether NVRTC is there; without it a test prints why it is skipped and returns, unless
    /// `LAZARUS_REQUIRE_NVRTC=1` makes its absence a failure (CI jobs that install NVRTC).
    fn nvrtc_or_skip(test: &str) -> bool {
        if nvrtc_present() {
            return true;
        }
        let required = std::env::var("LAZARUS_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{test}: LAZARUS_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH={})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
        eprintln!(
            "{test}: SKIPPED, libnvrtc cannot be loaded (put NVRTC's lib directory on \
             LD_LIBRARY_PATH; scripts/nvrtc-setup.sh fetches one)"
        );
        false
    }

    /// A fresh directory under the target's temporary space, removed by the caller.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lazarus-kernel-cache-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn every_source_compiles_cleanly_for_sm80_and_sm90() {
        if !nvrtc_or_skip("every_source_compiles_cleanly_for_sm80_and_sm90") {
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let kernels = match compile_kernels(arch, None) {
                Ok(kernels) => kernels,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(kernels.modules.len(), SOURCES.len());
            for module in &kernels.modules {
                assert!(!module.from_cache);
                assert!(
                    module.log.is_empty(),
                    "NVRTC warned about {} for {arch}:\n{}",
                    module.name,
                    module.log
                );
                assert!(module.cubin.starts_with(b"\x7fELF"), "{}", module.name);
                // Unmangled names end up in the cubin's symbol table.
                for name in &module.entry_points {
                    let found = module
                        .cubin
                        .windows(name.len())
                        .any(|w| w == name.as_bytes());
                    assert!(found, "{name} is not in the cubin of {}", module.name);
                }
            }
        }
    }

    /// The entry points the Rust side launches are exactly the ones the sources define.
    #[test]
    fn sources_define_exactly_the_launched_entry_points() {
        let defined: Vec<&str> = SOURCES.iter().flat_map(|s| entry_points(s.text)).collect();
        let unique: BTreeSet<&str> = defined.iter().copied().collect();
        assert_eq!(
            unique.len(),
            defined.len(),
            "an entry point is defined twice"
        );
        let mut launched: BTreeSet<&str> = f32_only::ALL.into_iter().collect();
        launched.extend(<f32 as Sealed>::ENTRIES.all());
        launched.extend(<bf16 as Sealed>::ENTRIES.all());
        assert_eq!(unique, launched);
    }

    #[test]
    fn entry_points_are_parsed_from_the_source() {
        let src = "extern \"C\" __global__ void a_f32(int x) {}\n\
                   __device__ void helper() {}\n\
                   extern \"C\" __global__ void\n    b_bf16(float* y) {}";
        assert_eq!(entry_points(src), ["a_f32", "b_bf16"]);
    }

    #[test]
    fn a_source_that_does_not_compile_returns_nvrtcs_log() {
        if !nvrtc_or_skip("a_source_that_does_not_compile_returns_nvrtcs_log") {
            return;
        }
        let broken = Source {
            name: "broken.cu",
            text:
                "#include \"common.cuh\"\nextern \"C\" __global__ void f(float* x) { x[0] = y; }\n",
        };
        let e = compile_source(&broken, "sm_90", &options("sm_90")).unwrap_err();
        let KernelError::Compile { arch, log } = &e else {
            panic!("not a compile error: {e}");
        };
        assert_eq!(arch, "sm_90");
        assert!(
            log.contains("broken.cu(2)") && log.contains("\"y\""),
            "{log}"
        );
        assert!(e.to_string().contains("broken.cu(2)"), "{e}");
        // An architecture NVRTC does not know is a compile error too, never a panic.
        let e = compile_kernels("sm_11", None).unwrap_err();
        assert!(
            matches!(&e, KernelError::Compile { log, .. } if !log.is_empty()),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_architecture_is_refused_before_nvrtc() {
        for arch in ["", "sm_", "90", "sm_9x0", "../sm_90", "compute_90"] {
            let e = compile_kernels(arch, None).unwrap_err();
            assert!(matches!(e, KernelError::Compile { .. }), "{arch}: {e}");
        }
    }

    #[test]
    fn the_cache_is_used_and_a_damaged_entry_is_replaced() {
        if !nvrtc_or_skip("the_cache_is_used_and_a_damaged_entry_is_replaced") {
            return;
        }
        let dir = scratch_dir("reuse");
        let first = compile_kernels("sm_90", Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(first.warnings.is_empty(), "{:?}", first.warnings);
        assert!(first.modules.iter().all(|m| !m.from_cache));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|entry| entry.map(|e| e.path()).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        files.sort();
        assert_eq!(files.len(), SOURCES.len(), "{files:?}");
        assert!(files
            .iter()
            .all(|f| f.extension().is_some_and(|e| e == "cubin")));

        let second = compile_kernels("sm_90", Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(second.warnings.is_empty(), "{:?}", second.warnings);
        for (a, b) in first.modules.iter().zip(&second.modules) {
            assert!(b.from_cache, "{} was compiled again", b.name);
            assert_eq!(a.cubin, b.cubin, "{}", a.name);
        }

        // Flip one byte of the payload of one entry and cut another short: both are
        // recompiled, reported, and rewritten with the right contents.
        let mut damaged = std::fs::read(&files[0]).unwrap_or_else(|e| panic!("{e}"));
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        std::fs::write(&files[0], &damaged).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&files[1], CACHE_MAGIC).unwrap_or_else(|e| panic!("{e}"));
        let third = compile_kernels("sm_90", Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(third.warnings.len(), 2, "{:?}", third.warnings);
        assert!(third.warnings.iter().all(|w| w.contains("damaged")));
        let recompiled = third.modules.iter().filter(|m| !m.from_cache).count();
        assert_eq!(recompiled, 2);
        for (a, b) in first.modules.iter().zip(&third.modules) {
            assert_eq!(a.cubin, b.cubin, "{}", a.name);
        }
        let fourth = compile_kernels("sm_90", Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(fourth.modules.iter().all(|m| m.from_cache));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_cache_is_a_warning_not_an_error() {
        if !nvrtc_or_skip("an_unwritable_cache_is_a_warning_not_an_error") {
            return;
        }
        // A regular file where the directory should be: creating the directory fails even
        // for root, which ignores permission bits.
        let blocker = scratch_dir("blocked");
        std::fs::write(&blocker, b"not a directory").unwrap_or_else(|e| panic!("{e}"));
        let kernels =
            compile_kernels("sm_80", Some(&blocker.join("kernels"))).unwrap_or_else(|e| {
                panic!("{e}");
            });
        assert_eq!(kernels.modules.len(), SOURCES.len());
        assert_eq!(
            kernels.warnings.len(),
            SOURCES.len(),
            "{:?}",
            kernels.warnings
        );
        assert!(kernels.warnings[0].contains("LAZARUS_KERNEL_CACHE"));
        let _ = std::fs::remove_file(&blocker);
    }

    #[test]
    fn cache_keys_depend_on_arch_version_and_options() {
        let source = &SOURCES[0];
        let options = options("sm_90");
        let base = cache_file_name(source, "sm_90", (13, 0), &options);
        assert!(base.starts_with("encoder-sm_90-") && base.ends_with(".cubin"));
        assert_ne!(base, cache_file_name(source, "sm_80", (13, 0), &options));
        assert_ne!(base, cache_file_name(source, "sm_90", (13, 1), &options));
        assert_ne!(
            base,
            cache_file_name(source, "sm_90", (13, 0), &options[1..])
        );
        assert_ne!(
            base,
            cache_file_name(&SOURCES[1], "sm_90", (13, 0), &options)
        );
        assert_eq!(base, cache_file_name(source, "sm_90", (13, 0), &options));
    }
}
