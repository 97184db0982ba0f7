//! Raw batch-1 kernel throughput without Python, per CPU kernel this machine has, against a
//! plain copy of the same bytes:
//! `cargo run --release -p qlorakit-core --example gemv_throughput [rows cols [blocksize [batch]]]`
//! (default 2048 2048 64 1; `RAYON_NUM_THREADS=1` for one core; `PLAIN=1` for plain float32
//! scales instead of double-quantized ones; `batch`: input rows per call, 1 to 8, whose
//! GB/s still count the packed bytes read once). Two settings: one layer called again and again
//! (its bytes in cache: the kernel's compute rate) and a chain of distinct layers larger than
//! a 32 MiB last-level cache (every byte from memory, as in decoding). NF4, bfloat16 input,
//! rayon's pool. (The side-by-side benchmark against bitsandbytes, through Python, is
//! tools/bench_gemv.py.)

mod common;

use std::hint::black_box;

use half::bf16;
use qlorakit_core::{
    gemv_4bit_with, Absmax, BlockScales, Blocksize, GemvKernel, PackedView, QuantType,
};

use common::{best_secs, Xorshift};

/// Bytes of a chain, at least: above a 32 MiB last-level cache.
const CHAIN_BYTES: usize = 128 << 20;

struct Layer {
    packed: Vec<u8>,
    scales: Absmax,
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let rows = args.next().and_then(Result::ok).unwrap_or(2048);
    let cols = args.next().and_then(Result::ok).unwrap_or(2048);
    let blocksize = args
        .next()
        .and_then(Result::ok)
        .map_or(Blocksize::default(), |b| {
            Blocksize::new(b).expect("a blocksize bitsandbytes writes")
        });
    let batch = args
        .next()
        .and_then(Result::ok)
        .unwrap_or(1)
        .clamp(1, qlorakit_core::GEMV_MAX_BATCH);
    let mut rng = Xorshift::new();
    let bytes_per_layer = rows * cols / 2;
    let chain = CHAIN_BYTES.div_ceil(bytes_per_layer).max(2);
    let layers: Vec<Layer> = (0..chain)
        .map(|_| {
            let packed = (0..bytes_per_layer).map(|_| rng.next_u64() as u8).collect();
            let absmax = (0..blocksize.blocks(rows * cols))
                .map(|_| 0.01 + rng.unit())
                .collect();
            Layer {
                packed,
                scales: Absmax::stored(absmax, std::env::var_os("PLAIN").is_none())
                    .expect("double quantize"),
            }
        })
        .collect();
    let x: Vec<bf16> = (0..cols * batch)
        .map(|_| bf16::from_f32(rng.unit() - 0.5))
        .collect();
    let mut out = vec![bf16::ZERO; rows * batch];
    let shape = [rows, cols];
    let views: Vec<PackedView<'_>> = layers
        .iter()
        .map(|l| {
            PackedView::new(
                &l.packed,
                l.scales.view(),
                QuantType::Nf4,
                blocksize,
                &shape,
            )
            .expect("view")
        })
        .collect();
    let stored_bytes = stored_bytes(&views[0]);
    let best = |f: &mut dyn FnMut()| {
        f(); // warm-up
        best_secs(7, f)
    };
    let mut copy_to = vec![0u8; bytes_per_layer];
    let copy_hot = best(&mut || {
        for _ in 0..chain {
            copy_to.copy_from_slice(black_box(&layers[0].packed));
        }
    }) / chain as f64;
    let copy_chain = best(&mut || {
        for layer in &layers {
            copy_to.copy_from_slice(black_box(&layer.packed));
        }
    }) / chain as f64;
    let gbs = |secs: f64| stored_bytes as f64 / secs / 1e9;
    println!(
        "{rows}x{cols}, {batch} input row(s), {} threads, chain of {chain} ({} MiB)",
        qlorakit_core::parallel::current_num_threads(),
        (chain * stored_bytes) >> 20
    );
    println!(
        "copy             hot {:7.1} GB/s   chain {:7.1} GB/s",
        gbs(copy_hot),
        gbs(copy_chain)
    );
    for kernel in GemvKernel::ALL.into_iter().filter(|k| k.is_supported()) {
        let hot = best(&mut || {
            for _ in 0..chain {
                gemv_4bit_with(kernel, &views[0], &x, None, &mut out).expect("gemv");
            }
        }) / chain as f64;
        let cold = best(&mut || {
            for view in &views {
                gemv_4bit_with(kernel, view, &x, None, &mut out).expect("gemv");
            }
        }) / chain as f64;
        println!(
            "{:<12} hot {:7.1} GB/s ({:3.0}% of copy)   chain {:7.1} GB/s ({:3.0}% of copy)   {:6.1} us/layer",
            kernel.name(),
            gbs(hot),
            100.0 * copy_hot / hot,
            gbs(cold),
            100.0 * copy_chain / cold,
            cold * 1e6,
        );
    }
}

/// The bytes a call reads: the packed codes and the stored scales (float32 absmax, or one
/// code per block plus the nested float32 scales).
fn stored_bytes(view: &PackedView<'_>) -> usize {
    let scales = match view.scales() {
        BlockScales::Plain(absmax) => 4 * absmax.len(),
        BlockScales::Nested { codes, scales, .. } => codes.len() + 4 * scales.len(),
    };
    view.codes().len() + scales
}
