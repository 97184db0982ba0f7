//! Where the per-call kernels (gemv, dequantize) run their tasks: rayon's global pool, or
//! the OpenMP runtime a host process already has loaded.
//!
//! A model's forward interleaves these kernels with the host's own (PyTorch's matmuls,
//! attention, norms), which run on an OpenMP team. Two pools on the same cores fight:
//! each one's idle workers spin for a while after a parallel region, so the other pool's
//! tasks share their cores with spinning threads (measured on a 2-core machine: a 1.1B
//! model decoding at 10-14 tokens/s instead of 18 with OpenMP's threads told not to spin).
//! [`share_openmp_runtime`] attaches to an OpenMP runtime that is already loaded (never
//! loading a second one) and from then on the kernels' tasks run as OpenMP parallel
//! regions on the host's threads, with its thread count. Work inside a rayon pool (the
//! checkpoint pipeline, which sizes its own pool) stays there.
//!
//! Results do not depend on the backend: every task writes its own outputs with a fixed
//! order of operations, whichever thread runs it.

use std::any::Any;
use std::ffi::{c_int, c_uint, c_void, CString};
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;
use thiserror::Error;

/// Why an OpenMP runtime could not be shared.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParallelError {
    /// The library is not loaded in this process (it is never loaded here), or the path
    /// cannot be passed to the loader.
    #[error("{path}: not an OpenMP runtime loaded in this process ({reason})")]
    NotLoaded { path: String, reason: String },
    /// The library lacks an entry point of the GNU OpenMP ABI (libgomp's, which LLVM's
    /// libomp and Intel's libiomp5 also export).
    #[error("{path}: no symbol {symbol} (not a GNU-ABI OpenMP runtime)")]
    MissingSymbol { path: String, symbol: &'static str },
    /// Another runtime was shared first; the first one stays.
    #[error("{path}: the OpenMP runtime {current} is already shared")]
    AlreadyShared { path: String, current: String },
}

type Microtask = unsafe extern "C" fn(*mut c_void);
type GompParallel = unsafe extern "C" fn(Microtask, *mut c_void, c_uint, c_uint);
type OmpQuery = unsafe extern "C" fn() -> c_int;

/// The entry points of a shared OpenMP runtime (its handle is never closed).
struct OpenMp {
    path: String,
    parallel: GompParallel,
    max_threads: OmpQuery,
    in_parallel: OmpQuery,
}

static OPENMP: OnceLock<OpenMp> = OnceLock::new();

/// Runs the kernels' tasks on the OpenMP runtime at `path`, which must already be loaded
/// in this process (the host's, e.g. PyTorch's `libgomp`). Sharing the same runtime again
/// is a no-op; a different one is an error (the first stays).
pub fn share_openmp_runtime(path: &Path) -> Result<(), ParallelError> {
    let name = path.display().to_string();
    if let Some(current) = OPENMP.get() {
        return if current.path == name {
            Ok(())
        } else {
            Err(ParallelError::AlreadyShared {
                path: name,
                current: current.path.clone(),
            })
        };
    }
    let runtime = open(path, name)?;
    // A racing caller may have set it meanwhile; either way one runtime is shared.
    let _ = OPENMP.set(runtime);
    Ok(())
}

/// The path of the shared OpenMP runtime, if any.
pub fn shared_openmp_runtime() -> Option<&'static str> {
    OPENMP.get().map(|runtime| runtime.path.as_str())
}

fn open(path: &Path, name: String) -> Result<OpenMp, ParallelError> {
    let not_loaded = |reason: String| ParallelError::NotLoaded {
        path: name.clone(),
        reason,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| not_loaded("the path holds a NUL byte".into()))?;
    // SAFETY: a valid C string; RTLD_NOLOAD only returns a library already loaded, so no
    // initializer runs.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(not_loaded(
            "dlopen with RTLD_NOLOAD found no such library".into(),
        ));
    }
    let symbol = |symbol: &'static str| -> Result<*mut c_void, ParallelError> {
        let c_symbol = CString::new(symbol).expect("symbol names hold no NUL");
        // SAFETY: a handle dlopen returned and a valid C string.
        let address = unsafe { libc::dlsym(handle, c_symbol.as_ptr()) };
        if address.is_null() {
            Err(ParallelError::MissingSymbol {
                path: name.clone(),
                symbol,
            })
        } else {
            Ok(address)
        }
    };
    let (parallel, max_threads, in_parallel) = (
        symbol("GOMP_parallel")?,
        symbol("omp_get_max_threads")?,
        symbol("omp_in_parallel")?,
    );
    // SAFETY: the GNU OpenMP ABI's signatures: `void GOMP_parallel(void (*)(void *),
    // void *, unsigned, unsigned)` and `int omp_get_max_threads(void)` /
    // `int omp_in_parallel(void)`.
    unsafe {
        Ok(OpenMp {
            path: name,
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
            max_threads: std::mem::transmute::<*mut c_void, OmpQuery>(max_threads),
            in_parallel: std::mem::transmute::<*mut c_void, OmpQuery>(in_parallel),
        })
    }
}

/// The OpenMP runtime the calling thread's tasks go to: shared, and the caller is neither
/// a rayon worker nor already inside an OpenMP parallel region.
fn openmp_for_caller() -> Option<&'static OpenMp> {
    let runtime = OPENMP.get()?;
    // SAFETY: a GNU-ABI query without arguments.
    let nested = unsafe { (runtime.in_parallel)() } != 0;
    (rayon::current_thread_index().is_none() && !nested).then_some(runtime)
}

/// Threads a task loop of the calling thread may use.
pub fn current_num_threads() -> usize {
    match openmp_for_caller() {
        // SAFETY: a GNU-ABI query without arguments.
        Some(runtime) => usize::try_from(unsafe { (runtime.max_threads)() })
            .unwrap_or(1)
            .max(1),
        None => rayon::current_num_threads(),
    }
}

/// Runs `task(0)` .. `task(tasks - 1)` in parallel (a single task on the calling thread)
/// and returns when all are done; a panic in a task is re-raised on the calling thread.
pub fn for_each_task(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    if tasks <= 1 {
        // One task runs where it is: handing it to a pool would only wake that pool's threads.
        return (0..tasks).for_each(task);
    }
    match openmp_for_caller() {
        Some(runtime) => run_openmp(runtime, tasks, task),
        None => (0..tasks).into_par_iter().for_each(task),
    }
}

/// Splits `data` into chunks of `chunk` elements (the last may be shorter) and runs
/// `task(index, chunk)` on each in parallel.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    task: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    assert!(chunk > 0, "chunk length");
    let len = data.len();
    let base = SharedMut(data.as_mut_ptr());
    let tasks = len.div_ceil(chunk);
    for_each_task(tasks, &|index| {
        let start = index * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunk `index` is `start..end` of `data`, in bounds and disjoint from
        // every other task's; `data` stays mutably borrowed until all tasks return.
        let slice = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        task(index, slice)
    });
}

/// A pointer into a slice whose disjoint chunks several tasks write.
struct SharedMut<T>(*mut T);

// SAFETY: only used to hand disjoint chunks of one `&mut [T]` (T: Send) to tasks.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn at(&self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets within the slice the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// What every thread of the OpenMP team reads: the tasks, the next one to take, and the
/// first panic.
struct Region<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

fn run_openmp(runtime: &OpenMp, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let region = Region {
        task,
        tasks,
        next: AtomicUsize::new(0),
        panic: Mutex::new(None),
    };
    // SAFETY: `region` outlives the call (GOMP_parallel returns after every thread of the
    // team has left `microtask`); num_threads 0 is the runtime's default team size.
    unsafe {
        (runtime.parallel)(
            microtask,
            std::ptr::addr_of!(region).cast_mut().cast(),
            0,
            0,
        )
    };
    let payload = region
        .panic
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(payload) = payload {
        panic::resume_unwind(payload);
    }
}

/// Each team thread takes tasks until none is left. No unwinding crosses into the C
/// runtime: a panic is kept for the calling thread and the remaining tasks are skipped.
unsafe extern "C" fn microtask(data: *mut c_void) {
    // SAFETY: `data` is the `Region` run_openmp passed, alive for the whole region.
    let region = unsafe { &*data.cast::<Region<'_>>() };
    loop {
        let index = region.next.fetch_add(1, Ordering::Relaxed);
        if index >= region.tasks {
            return;
        }
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (region.task)(index))) {
            region.next.store(region.tasks, Ordering::Relaxed);
            let mut first = region
                .panic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            first.get_or_insert(payload);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        let counts: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
        for_each_task(counts.len(), &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut data = vec![0usize; 1001];
        for_each_chunk_mut(&mut data, 100, &|index, chunk| {
            for (k, x) in chunk.iter_mut().enumerate() {
                *x = index * 100 + k;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &x)| i == x));
    }

    #[test]
    fn a_runtime_not_loaded_is_refused() {
        let error = share_openmp_runtime(Path::new("/nonexistent/libgomp.so.1")).unwrap_err();
        assert!(matches!(error, ParallelError::NotLoaded { .. }), "{error}");
        assert!(shared_openmp_runtime().is_none());
    }
}
