//! Raw core throughput without Python: `cargo run --release --example throughput [n]`.
//! (The side-by-side benchmark against bitsandbytes is tools/bench_quantize.py.)

use std::time::Instant;

use half::bf16;
use qlorakit_core::scale_search::quantize_4bit_searched;
use qlorakit_core::{
    dequantize_4bit, double_quantize, quantize_4bit, Blocksize, QuantType, ScalesMut,
};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(11008 * 4096);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let input: Vec<bf16> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bf16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let blocksize = Blocksize::default();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; blocksize.blocks(n)];
    let mut codes = vec![0u8; absmax.len()];
    let mut scales = vec![0f32; absmax.len().div_ceil(256)];
    let mut out = vec![bf16::ZERO; n];
    let best = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let quant = best(&mut || {
        quantize_4bit(&input, QuantType::Nf4, blocksize, &mut packed, &mut absmax)
            .expect("quantize");
    });
    let nested = best(&mut || {
        double_quantize(&absmax, &mut codes, &mut scales).expect("double quantize");
    });
    let dequant = best(&mut || {
        dequantize_4bit(&packed, &absmax, QuantType::Nf4, blocksize, &mut out).expect("dequantize");
    });
    let searched = best(&mut || {
        let mut store = ScalesMut::Nested {
            codes: &mut codes,
            scales: &mut scales,
            offset: 0.0,
        };
        let report = quantize_4bit_searched(
            &input,
            QuantType::Nf4,
            blocksize,
            None,
            &mut packed,
            &mut store,
        )
        .expect("scale search");
        assert!(!report.kept_absmax, "the search lost to absmax: {report:?}");
    });
    let rate = |secs: f64| n as f64 / secs / 1e9;
    println!("threads {}", rayon::current_num_threads());
    println!("quantize nf4 bf16  {:.2} Gparam/s", rate(quant));
    println!(
        "double quantize    {:.2} Gparam/s (of weights)",
        rate(nested)
    );
    println!("dequantize to bf16 {:.2} Gparam/s", rate(dequant));
    println!(
        "scale search + dq  {:.2} Gparam/s ({:.1}x quantize + double quantize)",
        rate(searched),
        searched / (quant + nested)
    );
}
