//! The kernels' tasks on a shared OpenMP runtime (the system's libgomp, loaded here as a
//! host such as PyTorch would have loaded its own): gemv and dequantize give the same bits
//! as on rayon's pool, a panic in a task reaches the caller, and the runtime can only be
//! shared once. One process, so these run in one test (the runtime is process-wide).

use std::ffi::CString;
use std::panic;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use qlorakit_core::parallel::{
    for_each_task, share_openmp_runtime, shared_openmp_runtime, ParallelError,
};
use qlorakit_core::{
    dequantize_4bit, gemv_4bit, quantize_4bit, Blocksize, PackedView, QuantType, Scales,
};

mod common;

use common::Rng;

/// Where Debian and most distributions install GNU OpenMP.
const LIBGOMP_CANDIDATES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/libgomp.so.1",
    "/lib/x86_64-linux-gnu/libgomp.so.1",
];

/// Whether the calling thread ran any of 32 tasks of 1 ms each: an OpenMP team includes
/// it, rayon's pool does not (the caller waits).
fn caller_takes_tasks() -> bool {
    let caller = std::thread::current().id();
    let ran = Mutex::new(Vec::new());
    for_each_task(32, &|_| {
        std::thread::sleep(Duration::from_millis(1));
        ran.lock().unwrap().push(std::thread::current().id());
    });
    let ran = ran.into_inner().unwrap();
    assert_eq!(ran.len(), 32);
    ran.contains(&caller)
}

/// A 1024 x 2048 layer (over the gemv's parallel threshold) and 1, 3 and 8 input rows.
fn outputs() -> Vec<Vec<f32>> {
    let (rows, cols) = (1024, 2048);
    let mut rng = Rng(7);
    let weight: Vec<f32> = (0..rows * cols)
        .map(|_| rng.below(1 << 24) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let blocksize = Blocksize::new(64).unwrap();
    let mut packed = vec![0u8; rows * cols / 2];
    let mut absmax = vec![0f32; rows * cols / 64];
    quantize_4bit(&weight, QuantType::Nf4, blocksize, &mut packed, &mut absmax).unwrap();
    let shape = [rows, cols];
    let view = PackedView::new(
        &packed,
        Scales::Plain(&absmax),
        QuantType::Nf4,
        blocksize,
        &shape,
    )
    .unwrap();
    let mut results = Vec::new();
    for batch in [1, 3, 8] {
        let x: Vec<f32> = (0..batch * cols)
            .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
            .collect();
        let mut out = vec![f32::NAN; batch * rows];
        gemv_4bit(&view, &x, None, &mut out).unwrap();
        results.push(out);
    }
    let mut decoded = vec![f32::NAN; rows * cols];
    dequantize_4bit(&packed, &absmax, QuantType::Nf4, blocksize, &mut decoded).unwrap();
    results.push(decoded);
    results
}

#[test]
fn kernels_on_a_shared_openmp_runtime() {
    let Some(path) = LIBGOMP_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        eprintln!("SKIPPED: no libgomp.so.1 at {LIBGOMP_CANDIDATES:?}");
        return;
    };
    // Not loaded yet: refused (the core never loads a runtime itself).
    let refused = share_openmp_runtime(path).unwrap_err();
    assert!(
        matches!(refused, ParallelError::NotLoaded { .. }),
        "{refused}"
    );
    let on_rayon = outputs();
    assert!(!caller_takes_tasks());

    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading a shared library by path, as a host process does.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "dlopen {path:?}");
    share_openmp_runtime(path).unwrap();
    share_openmp_runtime(path).unwrap(); // the same one again: a no-op
    assert_eq!(shared_openmp_runtime(), Some(path.to_str().unwrap()));
    let other = share_openmp_runtime(Path::new("/elsewhere/libomp.so")).unwrap_err();
    assert!(
        matches!(other, ParallelError::AlreadyShared { .. }),
        "{other}"
    );

    assert!(caller_takes_tasks());
    let on_openmp = outputs();
    for (a, b) in on_rayon.iter().zip(&on_openmp) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    // A panic inside a task reaches the caller instead of unwinding into the C runtime
    // (the default hook's message and backtrace, expected here, are kept out of the log).
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let caught = panic::catch_unwind(|| {
        for_each_task(64, &|i| {
            if i == 17 {
                panic!("task {i} failed");
            }
        })
    });
    panic::set_hook(hook);
    let payload = caught.unwrap_err();
    assert_eq!(
        payload.downcast_ref::<String>().map(String::as_str),
        Some("task 17 failed")
    );
    // And the runtime still works afterwards.
    assert_eq!(outputs(), on_openmp);
}
