//! Can this process open the CUDA driver and NCCL, with every function Lazarus calls? cudarc opens
//! both at run time and panics when a library or one of its symbols is missing, so `NcclComm`
//! asks here first and turns the answer into an error. The probe opens the libraries under the
//! names cudarc tries, in its order, so it finds the file cudarc will load.

use std::ffi::{c_void, CStr, CString};

/// Driver functions that cudarc calls for `NcclComm` (context, stream, events, copies, scratch).
const CUDA_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventDestroy_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuGetErrorString",
];

/// NCCL functions that `NcclComm` calls.
const NCCL_SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclAllReduce",
    "ncclReduceScatter",
    "ncclAllGather",
    "ncclBroadcast",
    "ncclGetErrorString",
    "ncclGetLastError",
];

/// NCCL 2.14.0 in NCCL's version encoding: the first release with non-blocking communicators,
/// which the watchdog needs to interrupt a hung collective.
const NCCL_VERSION_MIN: i32 = 21_400;

/// An open shared library, closed on drop.
struct Library(*mut c_void);

impl Library {
    /// Opens `name` the way cudarc's loader does (`RTLD_LAZY | RTLD_LOCAL`, so the same search
    /// path: LD_LIBRARY_PATH, RUNPATH, the ld.so cache); the error is the loader's message.
    fn open(name: &str) -> Result<Library, String> {
        let c_name = CString::new(name).map_err(|_| format!("bad library name {name:?}"))?;
        // SAFETY: a NUL-terminated name and valid flags. Opening runs the library's initialisers,
        // which cudarc's own load of the same file would run anyway.
        let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if handle.is_null() {
            Err(last_dl_error())
        } else {
            Ok(Library(handle))
        }
    }

    fn has(&self, symbol: &str) -> bool {
        let Ok(c_symbol) = CString::new(symbol) else {
            return false;
        };
        // SAFETY: a handle from dlopen that is still open, and a NUL-terminated symbol name.
        !unsafe { libc::dlsym(self.0, c_symbol.as_ptr()) }.is_null()
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once. cudarc keeps its own handle,
        // so a library it already loaded stays loaded.
        unsafe { libc::dlclose(self.0) };
    }
}

/// The dynamic loader's message for the last failed call on this thread.
fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by the loader, which stays
    // valid until the next dl* call on this thread; it is copied out at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown loader error".to_string()
    } else {
        // SAFETY: non-null and NUL-terminated, see above.
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

/// What looking for one library found.
enum Probe {
    Found,
    NotFound {
        tried: Vec<String>,
        error: String,
    },
    MissingSymbols {
        file: String,
        missing: Vec<&'static str>,
    },
}

/// Opens the first of cudarc's candidate names for `libs` that loads and checks `symbols` in it.
fn probe(libs: &[&str], symbols: &[&'static str]) -> Probe {
    let tried: Vec<String> = libs
        .iter()
        .flat_map(|lib| cudarc::get_lib_name_candidates(lib))
        .collect();
    let mut first_error = None;
    for name in &tried {
        match Library::open(name) {
            Ok(lib) => {
                let missing: Vec<&'static str> =
                    symbols.iter().copied().filter(|s| !lib.has(s)).collect();
                return if missing.is_empty() {
                    Probe::Found
                } else {
                    Probe::MissingSymbols {
                        file: name.clone(),
                        missing,
                    }
                };
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Probe::NotFound {
        tried,
        error: first_error.unwrap_or_default(),
    }
}

/// The candidate names, without repeats, shortened when there are many.
fn tried_text(tried: &[String]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for name in tried {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    if names.len() <= 6 {
        names.join(", ")
    } else {
        format!(
            "{}, ... {} ({} names)",
            names[..4].join(", "),
            names[names.len() - 2..].join(", "),
            names.len()
        )
    }
}

fn search_path() -> String {
    std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "unset".to_string())
}

/// `Ok` when the CUDA driver and NCCL (2.14 or newer) can be opened with every function Lazarus
/// calls; otherwise what is missing and what to do about it. Makes no CUDA call unless both
/// libraries are complete (then only `ncclGetVersion`).
pub fn libraries_available() -> Result<(), String> {
    match probe(&["cuda", "nvcuda"], CUDA_SYMBOLS) {
        Probe::Found => {}
        Probe::NotFound { tried, error } => {
            return Err(format!(
                "the CUDA driver library could not be opened (tried {}; the loader said: \
                 {error}): this machine has no NVIDIA driver, or its libcuda.so is not on the \
                 library search path (LD_LIBRARY_PATH={})",
                tried_text(&tried),
                search_path()
            ))
        }
        Probe::MissingSymbols { file, missing } => {
            return Err(format!(
                "the CUDA driver library {file} lacks {missing:?}: the NVIDIA driver is too old \
                 for CUDA 13; update it"
            ))
        }
    }
    match probe(&["nccl"], NCCL_SYMBOLS) {
        Probe::Found => {}
        Probe::NotFound { tried, error } => return Err(nccl_not_found(&tried, &error)),
        Probe::MissingSymbols { file, missing } => {
            return Err(format!(
                "the NCCL library {file} lacks {missing:?}: Lazarus needs NCCL 2.14 or newer"
            ))
        }
    }
    let version = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| format!("ncclGetVersion failed ({:?})", e.0))?;
    if version < NCCL_VERSION_MIN {
        return Err(format!(
            "NCCL {} is too old: Lazarus needs 2.14 or newer (non-blocking communicators, which \
             let a hung collective be aborted)",
            version_text(version)
        ));
    }
    Ok(())
}

/// The message when no candidate name of NCCL opens. NCCL installs `libnccl.so.2`, which is not
/// among cudarc's names, so the usual cause is a missing `libnccl.so` link.
fn nccl_not_found(tried: &[String], error: &str) -> String {
    let fix = "put a symlink `libnccl.so -> libnccl.so.2` in a directory on LD_LIBRARY_PATH \
               (scripts/gpu-env.sh makes one)";
    if Library::open("libnccl.so.2").is_ok() {
        format!(
            "NCCL is installed as libnccl.so.2, but cudarc opens NCCL only under the names \
             {}, which do not include libnccl.so.2: {fix}",
            tried_text(tried)
        )
    } else {
        format!(
            "NCCL could not be opened (tried {}; the loader said: {error}; \
             LD_LIBRARY_PATH={}): install NCCL 2.14 or newer (libnccl2, or the nvidia-nccl \
             wheel), add its directory to LD_LIBRARY_PATH, and since cudarc does not look for \
             libnccl.so.2, {fix}",
            tried_text(tried),
            search_path()
        )
    }
}

/// NCCL's version code as `major.minor.patch` (codes from 2.9 on are `major*10000 +
/// minor*100 + patch`, earlier ones `major*1000 + minor*100 + patch`).
fn version_text(code: i32) -> String {
    if code >= 10_000 {
        format!("{}.{}.{}", code / 10_000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_read_as_nccl_writes_them() {
        assert_eq!(version_text(21_400), "2.14.0");
        assert_eq!(version_text(23_004), "2.30.4");
        assert_eq!(version_text(2_804), "2.8.4");
    }

    #[test]
    fn a_missing_library_is_an_answer_not_a_panic() {
        match probe(&["lazarus-no-such-library"], &["f"]) {
            Probe::NotFound { tried, error } => {
                assert!(tried.iter().any(|t| t == "liblazarus-no-such-library.so"));
                assert!(!error.is_empty());
            }
            _ => panic!("a library that does not exist was found"),
        }
        let text = nccl_not_found(&["libnccl.so".to_string()], "not found");
        assert!(text.contains("libnccl.so -> libnccl.so.2"), "{text}");
        let many: Vec<String> = (0..9).map(|i| format!("lib{}.so", i % 8)).collect();
        assert_eq!(
            tried_text(&many),
            "lib0.so, lib1.so, lib2.so, lib3.so, ... lib6.so, lib7.so (8 names)"
        );
    }
}
