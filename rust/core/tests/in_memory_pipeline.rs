//! The in-memory pipeline (`quantize_in_memory`, what quantize-on-load runs) writes exactly
//! the bytes the checkpoint pipeline stores in its shards, for every quantization method and
//! orientation, and refuses output memory that does not fit the selection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use qlorakit_core::checkpoint::quant_state::quant_state_key;
use qlorakit_core::checkpoint::safetensors::SafetensorsFile;
use qlorakit_core::checkpoint::{
    quantize_checkpoint, quantize_in_memory, CheckpointError, Options, Orientation, Selection,
    Source, WeightOut, ERROR_SAMPLE_STRIDE,
};
use qlorakit_core::layout::{nested_blocks, packed_len};
use qlorakit_core::{BlockScales, Blocksize, QuantType};

mod common;

use common::Rng;

impl Rng {
    /// Roughly normal(0, 0.02), as linear weights are.
    fn weight(&mut self) -> f32 {
        let sum: f32 = (0..4)
            .map(|_| self.below(1 << 24) as f32 / (1u32 << 24) as f32 - 0.5)
            .sum();
        sum * 0.035
    }
}

/// A fresh empty directory under the system's temporary directory.
fn fresh_dir(label: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("qlorakit-in-memory-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// One source tensor: name, safetensors dtype, shape and little-endian bytes.
struct Tensor {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn tensor(rng: &mut Rng, name: &'static str, dtype: &'static str, shape: &[usize]) -> Tensor {
    let numel: usize = shape.iter().product();
    let bytes = (0..numel)
        .flat_map(|_| {
            let x = rng.weight();
            match dtype {
                "BF16" => bf16::from_f32(x).to_le_bytes().to_vec(),
                "F16" => f16::from_f32(x).to_le_bytes().to_vec(),
                _ => x.to_le_bytes().to_vec(),
            }
        })
        .collect();
    Tensor {
        name,
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// Writes `tensors` as `dir/model.safetensors`.
fn write_safetensors(dir: &Path, tensors: &[Tensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.into(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut image = (text.len() as u64).to_le_bytes().to_vec();
    image.extend_from_slice(text.as_bytes());
    for t in tensors {
        image.extend_from_slice(&t.bytes);
    }
    std::fs::write(dir.join("model.safetensors"), image).expect("write the source checkpoint");
}

fn source_tensors() -> Vec<Tensor> {
    let mut rng = Rng(0x1a7e_5eed);
    vec![
        tensor(&mut rng, "embed.weight", "BF16", &[16, 64]),
        tensor(&mut rng, "layer.q.weight", "BF16", &[96, 64]),
        tensor(&mut rng, "layer.conv.weight", "F32", &[64, 80]),
        tensor(&mut rng, "layer.half.weight", "F16", &[41, 71]),
        tensor(&mut rng, "norm.weight", "F32", &[64]),
    ]
}

fn selection() -> Selection {
    HashMap::from([
        ("layer.q.weight".to_string(), Orientation::AsStored),
        ("layer.conv.weight".to_string(), Orientation::Transposed),
        ("layer.half.weight".to_string(), Orientation::AsStored),
    ])
}

fn options(blocksize: usize, double_quant: bool, scale_search: bool) -> Options {
    Options {
        quant_type: QuantType::Nf4,
        blocksize: Blocksize::new(blocksize).expect("a valid block size"),
        double_quant,
        max_shard_bytes: 1 << 30,
        error_sample_stride: ERROR_SAMPLE_STRIDE,
        scale_search,
        importance: None,
        hessians: None,
        gptq_damp: 0.01,
        durable: false,
    }
}

/// Memory for one tensor of `numel` elements: codes, absmax (float32, or the nested codes as
/// bytes) and the nested scales.
struct Buffers {
    codes: Vec<u8>,
    absmax: Vec<f32>,
    nested_codes: Vec<u8>,
    nested_scales: Vec<f32>,
}

impl Buffers {
    fn new(numel: usize, options: &Options) -> Self {
        let blocks = options.blocksize.blocks(numel);
        let nested = usize::from(options.double_quant);
        Buffers {
            codes: vec![0; packed_len(numel)],
            absmax: vec![0.0; blocks * (1 - nested)],
            nested_codes: vec![0; blocks * nested],
            nested_scales: vec![0.0; nested_blocks(blocks) * nested],
        }
    }

    fn target(&mut self, double_quant: bool) -> WeightOut<'_> {
        let scales = if double_quant {
            BlockScales::Nested {
                codes: &mut self.nested_codes[..],
                scales: &mut self.nested_scales[..],
                offset: 0.0,
            }
        } else {
            BlockScales::Plain(&mut self.absmax[..])
        };
        WeightOut {
            codes: &mut self.codes,
            scales,
        }
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn numel_of(name: &str) -> usize {
    let tensors = source_tensors();
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .expect("a source tensor");
    t.shape.iter().product()
}

#[test]
fn in_memory_bytes_equal_the_checkpoint_shards() {
    let source_dir = fresh_dir("source");
    write_safetensors(&source_dir, &source_tensors());
    let source = Source::open(&source_dir).expect("open the source");
    let selected = selection();
    for (blocksize, double_quant, scale_search) in [
        (64, true, false),
        (64, false, false),
        (128, true, true),
        (256, false, true),
    ] {
        let options = options(blocksize, double_quant, scale_search);
        let out_dir = fresh_dir("shards");
        quantize_checkpoint(
            &source,
            &selected,
            &out_dir,
            &options,
            &BTreeMap::new(),
            &mut |_| true,
        )
        .expect("the checkpoint pipeline runs");
        let shard = SafetensorsFile::open(&out_dir.join("model.safetensors")).expect("one shard");
        let stored = |name: &str| -> Vec<u8> {
            let info = shard
                .tensors
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{name} in the shard"));
            shard.bytes(info).to_vec()
        };

        let mut buffers: BTreeMap<String, Buffers> = selected
            .keys()
            .map(|name| (name.clone(), Buffers::new(numel_of(name), &options)))
            .collect();
        let outputs = buffers
            .iter_mut()
            .map(|(name, b)| (name.clone(), b.target(double_quant)))
            .collect();
        let mut events = 0;
        let report = quantize_in_memory(&source, &selected, &options, outputs, &mut |_| {
            events += 1;
            true
        })
        .expect("the in-memory pipeline runs");
        assert_eq!(events, source.tensors().count());
        assert_eq!(report.tensors.len(), source.tensors().count());
        let states: BTreeMap<_, _> = report.quant_states.iter().cloned().collect();
        let case = format!(
            "blocksize {blocksize}, double_quant {double_quant}, scale_search {scale_search}"
        );
        for (name, b) in &buffers {
            assert_eq!(b.codes, stored(name), "codes of {name} ({case})");
            if double_quant {
                assert_eq!(
                    b.nested_codes,
                    stored(&format!("{name}.absmax")),
                    "{name} ({case})"
                );
                assert_eq!(
                    f32_bytes(&b.nested_scales),
                    stored(&format!("{name}.nested_absmax")),
                    "{name} ({case})"
                );
            } else {
                assert_eq!(
                    f32_bytes(&b.absmax),
                    stored(&format!("{name}.absmax")),
                    "{name} ({case})"
                );
            }
            let key = quant_state_key(name, options.quant_type);
            assert_eq!(states[&key].as_bytes(), &stored(&key)[..], "{key} ({case})");
        }
        for t in &report.tensors {
            assert_eq!(t.quantized, selected.contains_key(&t.name), "{}", t.name);
        }
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    let _ = std::fs::remove_dir_all(&source_dir);
}

#[test]
fn output_memory_that_does_not_fit_is_refused() {
    let source_dir = fresh_dir("refused");
    write_safetensors(&source_dir, &source_tensors());
    let source = Source::open(&source_dir).expect("open the source");
    let selected = selection();
    let options = options(64, true, false);
    let run = |drop_name: Option<&str>, short_name: Option<&str>, extra: bool| {
        let mut buffers: BTreeMap<String, Buffers> = selected
            .keys()
            .filter(|name| Some(name.as_str()) != drop_name)
            .map(|name| (name.clone(), Buffers::new(numel_of(name), &options)))
            .collect();
        if let Some(name) = short_name {
            buffers.get_mut(name).expect("selected").codes.pop();
        }
        if extra {
            buffers.insert("norm.weight".into(), Buffers::new(64, &options));
        }
        let outputs = buffers
            .iter_mut()
            .map(|(name, b)| (name.clone(), b.target(true)))
            .collect();
        match quantize_in_memory(&source, &selected, &options, outputs, &mut |_| true) {
            Err(CheckpointError::BadOutput { tensor, reason }) => format!("{tensor}: {reason}"),
            other => panic!("expected BadOutput, got {other:?}"),
        }
    };
    assert!(run(Some("layer.half.weight"), None, false)
        .starts_with("layer.half.weight: no output memory"));
    assert!(run(None, Some("layer.q.weight"), false).starts_with("layer.q.weight: holds"));
    assert!(
        run(None, None, true).starts_with("norm.weight: given for a tensor that is not selected")
    );
    let _ = std::fs::remove_dir_all(&source_dir);
}
