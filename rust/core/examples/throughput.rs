//! Raw core throughput without Python: `cargo run --release --example throughput [n]`.
//! (The side-by-side benchmark against bitsandbytes is tools/bench_quantize.py.)

mod common;

use common::{best_secs, Xorshift};

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
    let mut rng = Xorshift::new();
    let input: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.unit() - 0.5)).collect();
    let blocksize = Blocksize::default();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; blocksize.blocks(n)];
    let mut codes = vec![0u8; absmax.len()];
    let mut scales = vec![0f32; absmax.len().div_ceil(256)];
    let mut out = vec![bf16::ZERO; n];
    let best = |f: &mut dyn FnMut()| best_secs(5, f);
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
