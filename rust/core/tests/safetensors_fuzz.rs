//! Fuzzes the safetensors header parser: it must never panic, and whatever it accepts must
//! be safe to read.
//!
//! Each iteration builds a valid safetensors image (a few tensors of random dtypes and
//! shapes, an optional `__metadata__`), then damages it: edits of the header JSON (swapped
//! numbers, negative / huge / fractional offsets, tensors moved onto each other, wrong
//! types, deleted and duplicated keys, unicode and escapes, deeply nested arrays, bad
//! dtypes and shapes) and edits of the bytes (flips, truncation, random header lengths,
//! inserted and deleted bytes, invalid UTF-8).
//! `parse` must return `Ok` or `Err` without panicking, and on `Ok` every tensor's
//! `[begin, end)` lies inside the data buffer, is `numel * dtype.size()` bytes long, and
//! no two non-empty tensors overlap.
//!
//! Deterministic: a splitmix64 stream seeded per iteration, so a failure names the seed
//! that reproduces it. `QLORAKIT_FUZZ_ITERATIONS` and `QLORAKIT_FUZZ_SEED` override the
//! defaults (50 000 iterations in release builds, 20 000 in debug builds).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use qlorakit_core::checkpoint::safetensors::{parse, Dtype, TensorInfo};

const DEFAULT_ITERATIONS: u64 = if cfg!(debug_assertions) {
    20_000
} else {
    50_000
};
const DEFAULT_SEED: u64 = 0x5afe_7e25_0125;

const DTYPES: [&str; 15] = [
    "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "I64", "U64", "F64",
];

// ---------------------------------------------------------------------------------------
// Deterministic random numbers
// ---------------------------------------------------------------------------------------

mod common;

use common::Rng;

impl Rng {
    fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.next_u64() % denominator < numerator
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------
// A JSON tree that can say things serde_json's `Value` cannot (duplicate keys, raw text)
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Json {
    Null,
    Bool(bool),
    /// A number as its literal text, so it can be anything from `-0` to `1e400`.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    /// Entries in order; keys may repeat.
    Obj(Vec<(String, Json)>),
    /// Spliced in verbatim (deep nesting, garbage).
    Raw(String),
}

fn render(json: &Json, out: &mut String) {
    match json {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Num(text) | Json::Raw(text) => out.push_str(text),
        Json::Str(text) => render_str(text, out),
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render(item, out);
            }
            out.push(']');
        }
        Json::Obj(entries) => {
            out.push('{');
            for (i, (key, value)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render_str(key, out);
                out.push(':');
                render(value, out);
            }
            out.push('}');
        }
    }
}

fn render_str(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn num(n: impl std::fmt::Display) -> Json {
    Json::Num(n.to_string())
}

// ---------------------------------------------------------------------------------------
// Valid images
// ---------------------------------------------------------------------------------------

/// Tensor names, including ones a careless parser might trip on.
fn tensor_name(rng: &mut Rng, index: usize) -> String {
    match rng.below(8) {
        0 => format!("model.layers.{index}.mlp.up_proj.weight"),
        1 => format!("t{index}"),
        2 => format!("ünïcödé.{index}.权重.🦀"),
        3 => format!("quote\"back\\slash\u{1}.{index}"),
        4 => format!("{index}"),
        5 => format!("__metadata__{index}"),
        6 => format!("{}.{index}", "x".repeat(rng.below(300))),
        _ => format!("layer.{index}.weight"),
    }
}

/// A valid header (as a tree) and the data buffer it describes.
fn valid_image(rng: &mut Rng) -> (Json, Vec<u8>) {
    let mut entries = Vec::new();
    if rng.chance(1, 2) {
        let mut metadata = vec![("format".to_string(), Json::Str("pt".into()))];
        for i in 0..rng.below(4) {
            metadata.push((format!("key{i}"), Json::Str(format!("välue {i} \u{7}"))));
        }
        entries.push(("__metadata__".to_string(), Json::Obj(metadata)));
    }
    let mut offset = 0usize;
    for index in 0..rng.below(6) {
        let dtype = *rng.pick(&DTYPES);
        let size = Dtype::parse(dtype).expect("known dtype").size();
        let shape: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(7)).collect();
        let len = size * shape.iter().product::<usize>();
        // Occasionally a gap before the tensor: the format does not forbid one.
        if rng.chance(1, 8) {
            offset += rng.below(16);
        }
        let entry = Json::Obj(vec![
            ("dtype".into(), Json::Str(dtype.into())),
            ("shape".into(), Json::Arr(shape.iter().map(num).collect())),
            (
                "data_offsets".into(),
                Json::Arr(vec![num(offset), num(offset + len)]),
            ),
        ]);
        entries.push((tensor_name(rng, index), entry));
        offset += len;
    }
    // Shuffle the entries: header order need not follow data order.
    for i in (1..entries.len()).rev() {
        let j = rng.below(i + 1);
        entries.swap(i, j);
    }
    let trailing = if rng.chance(1, 8) { rng.below(8) } else { 0 };
    let data = (0..offset + trailing)
        .map(|_| rng.next_u64() as u8)
        .collect();
    (Json::Obj(entries), data)
}

fn assemble(header: &[u8], pad: usize, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + header.len() + pad + data.len());
    bytes.extend_from_slice(&((header.len() + pad) as u64).to_le_bytes());
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + pad, b' ');
    bytes.extend_from_slice(data);
    bytes
}

// ---------------------------------------------------------------------------------------
// Damage
// ---------------------------------------------------------------------------------------

/// Every node of the tree, by path of child indices (a pre-order walk).
fn node_paths(json: &Json, path: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(path.clone());
    let children: Vec<&Json> = match json {
        Json::Arr(items) => items.iter().collect(),
        Json::Obj(entries) => entries.iter().map(|(_, v)| v).collect(),
        _ => return,
    };
    for (i, child) in children.into_iter().enumerate() {
        path.push(i);
        node_paths(child, path, out);
        path.pop();
    }
}

fn node_mut<'a>(json: &'a mut Json, path: &[usize]) -> &'a mut Json {
    let Some((&first, rest)) = path.split_first() else {
        return json;
    };
    match json {
        Json::Arr(items) => node_mut(&mut items[first], rest),
        Json::Obj(entries) => node_mut(&mut entries[first].1, rest),
        _ => unreachable!("paths come from node_paths"),
    }
}

fn random_node_path(rng: &mut Rng, json: &Json, want: fn(&Json) -> bool) -> Option<Vec<usize>> {
    let mut all = Vec::new();
    node_paths(json, &mut Vec::new(), &mut all);
    let matching: Vec<Vec<usize>> = all
        .into_iter()
        .filter(|path| want(node_ref(json, path)))
        .collect();
    (!matching.is_empty()).then(|| rng.pick(&matching).clone())
}

fn node_ref<'a>(json: &'a Json, path: &[usize]) -> &'a Json {
    let Some((&first, rest)) = path.split_first() else {
        return json;
    };
    match json {
        Json::Arr(items) => node_ref(&items[first], rest),
        Json::Obj(entries) => node_ref(&entries[first].1, rest),
        _ => unreachable!("paths come from node_paths"),
    }
}

fn is_number(json: &Json) -> bool {
    matches!(json, Json::Num(_))
}

fn is_nonempty_object(json: &Json) -> bool {
    matches!(json, Json::Obj(entries) if !entries.is_empty())
}

fn is_number_pair(json: &Json) -> bool {
    matches!(json, Json::Arr(items) if items.len() == 2 && items.iter().all(is_number))
}

/// An object with a usable `data_offsets` entry (a tensor, possibly damaged elsewhere).
fn is_tensor_entry(json: &Json) -> bool {
    entry_offsets(json).is_some()
}

/// `[begin, end]` of a `data_offsets` value, when it is two plain non-decreasing integers.
fn offsets(value: &Json) -> Option<(usize, usize)> {
    let Json::Arr(items) = value else { return None };
    let [Json::Num(begin), Json::Num(end)] = items.as_slice() else {
        return None;
    };
    let (begin, end) = (begin.parse().ok()?, end.parse().ok()?);
    (begin <= end && end < usize::MAX / 4).then_some((begin, end))
}

fn entry_offsets(entry: &Json) -> Option<(usize, usize)> {
    let Json::Obj(entries) = entry else {
        return None;
    };
    entries
        .iter()
        .filter(|(k, _)| k == "data_offsets")
        .find_map(|(_, v)| offsets(v))
}

/// Number literals that stress integer conversion.
fn nasty_number(rng: &mut Rng, data_len: usize) -> String {
    let candidates = [
        "-1".to_string(),
        "-0".to_string(),
        "0".to_string(),
        "1.5".to_string(),
        "1e3".to_string(),
        "1e400".to_string(),
        "-1e400".to_string(),
        "0.0".to_string(),
        u32::MAX.to_string(),
        (u64::MAX / 2).to_string(),
        (u64::MAX / 2 + 1).to_string(),
        u64::MAX.to_string(),
        "18446744073709551616".to_string(),
        "340282366920938463463374607431768211457".to_string(),
        i64::MIN.to_string(),
        data_len.to_string(),
        (data_len + 1).to_string(),
        data_len.saturating_sub(1).to_string(),
        (1u64 << 32).to_string(),
        (1u64 << 62).to_string(),
        "00".to_string(),
        "+1".to_string(),
        "NaN".to_string(),
        "Infinity".to_string(),
    ];
    if rng.chance(1, 4) {
        rng.next_u64().to_string()
    } else {
        rng.pick(&candidates).clone()
    }
}

fn random_value(rng: &mut Rng, data_len: usize) -> Json {
    match rng.below(9) {
        0 => Json::Null,
        1 => Json::Bool(rng.chance(1, 2)),
        2 => Json::Num(nasty_number(rng, data_len)),
        3 => Json::Str(rng.pick(&DTYPES).to_string()),
        4 => Json::Str("Q4".into()),
        5 => Json::Arr(vec![]),
        6 => Json::Obj(vec![]),
        7 => Json::Arr(
            (0..rng.below(5))
                .map(|_| Json::Num(nasty_number(rng, data_len)))
                .collect(),
        ),
        _ => Json::Str(String::new()),
    }
}

fn deep_nesting(rng: &mut Rng) -> Json {
    let depth = *rng.pick(&[64, 127, 128, 129, 1_000, 100_000]);
    let (open, close) = if rng.chance(1, 2) {
        ("[", "]")
    } else {
        ("{\"a\":", "}")
    };
    let balanced = rng.chance(3, 4);
    let mut text = open.repeat(depth);
    text.push('0');
    text.push_str(&close.repeat(if balanced { depth } else { depth / 2 }));
    Json::Raw(text)
}

/// One random edit of the header tree.
fn mutate_json(rng: &mut Rng, root: &mut Json, data_len: usize) {
    match rng.below(14) {
        // Swap two numbers.
        0 => {
            if let (Some(a), Some(b)) = (
                random_node_path(rng, root, is_number),
                random_node_path(rng, root, is_number),
            ) {
                let first = node_ref(root, &a).clone();
                let second = std::mem::replace(node_mut(root, &b), first);
                *node_mut(root, &a) = second;
            }
        }
        // A number becomes negative, huge, fractional, or just another size.
        1 | 2 => {
            if let Some(path) = random_node_path(rng, root, is_number) {
                *node_mut(root, &path) = Json::Num(nasty_number(rng, data_len));
            }
        }
        // Any node becomes a value of another type.
        3 => {
            if let Some(path) = random_node_path(rng, root, |_| true) {
                *node_mut(root, &path) = random_value(rng, data_len);
            }
        }
        // Delete a key.
        4 => {
            if let Some(path) = random_node_path(rng, root, is_nonempty_object) {
                if let Json::Obj(entries) = node_mut(root, &path) {
                    let i = rng.below(entries.len());
                    entries.remove(i);
                }
            }
        }
        // Duplicate a key, the copy sometimes changed.
        5 => {
            if let Some(path) = random_node_path(rng, root, is_nonempty_object) {
                let changed = rng.chance(1, 2).then(|| random_value(rng, data_len));
                if let Json::Obj(entries) = node_mut(root, &path) {
                    let i = rng.below(entries.len());
                    let mut copy = entries[i].clone();
                    if let Some(value) = changed {
                        copy.1 = value;
                    }
                    let at = rng.below(entries.len() + 1);
                    entries.insert(at, copy);
                }
            }
        }
        // Unicode in keys and strings.
        6 => {
            let texts = [
                "\u{0}",
                "é",
                "🦀",
                "\u{202e}evil",
                "a\u{301}",
                "\u{feff}",
                "dtype",
                "shape",
                "data_offsets",
                "__metadata__",
            ];
            let text = rng.pick(&texts).to_string();
            if let Some(path) = random_node_path(rng, root, is_nonempty_object) {
                if let Json::Obj(entries) = node_mut(root, &path) {
                    let i = rng.below(entries.len());
                    entries[i].0 = text;
                }
            } else if let Some(path) = random_node_path(rng, root, |j| matches!(j, Json::Str(_))) {
                *node_mut(root, &path) = Json::Str(text);
            }
        }
        // Deep nesting in place of any node.
        7 => {
            if let Some(path) = random_node_path(rng, root, |_| true) {
                *node_mut(root, &path) = deep_nesting(rng);
            }
        }
        // Offsets aimed at the buffer's edges, or reversed.
        8 => {
            if let Some(path) = random_node_path(rng, root, is_number_pair) {
                let begin = rng.below(data_len + 2);
                let end = match rng.below(4) {
                    0 => begin.saturating_sub(1),
                    1 => data_len + rng.below(3),
                    2 => begin,
                    _ => rng.below(data_len + 2),
                };
                *node_mut(root, &path) = Json::Arr(vec![num(begin), num(end)]);
            }
        }
        // A tensor moved onto (or next to) another one, keeping its length: overlaps.
        12 | 13 => {
            if let (Some(a), Some(b)) = (
                random_node_path(rng, root, is_tensor_entry),
                random_node_path(rng, root, is_tensor_entry),
            ) {
                let (a_begin, a_end) = entry_offsets(node_ref(root, &a)).unwrap();
                let (b_begin, b_end) = entry_offsets(node_ref(root, &b)).unwrap();
                let begin = match rng.below(5) {
                    0 => b_begin,
                    1 => b_begin + 1,
                    2 => b_begin.saturating_sub(1),
                    3 => b_end.saturating_sub(1),
                    _ => (b_begin + b_end) / 2,
                };
                let end = begin + (a_end - a_begin);
                if let Json::Obj(entries) = node_mut(root, &a) {
                    for (key, value) in entries.iter_mut() {
                        if key == "data_offsets" {
                            *value = Json::Arr(vec![num(begin), num(end)]);
                        }
                    }
                }
            }
        }
        // Shapes whose element count overflows, or that are empty.
        9 => {
            if let Some(path) = random_node_path(rng, root, |j| matches!(j, Json::Arr(_))) {
                let huge = [
                    vec![u64::MAX, 2],
                    vec![1 << 32, 1 << 32],
                    vec![1 << 31, 1 << 31, 1 << 31],
                    vec![0, u64::MAX, u64::MAX],
                    vec![u64::MAX, u64::MAX, 0],
                    vec![1 << 61],
                    vec![],
                    vec![0],
                ];
                let dims = rng.pick(&huge);
                *node_mut(root, &path) = Json::Arr(dims.iter().map(num).collect());
            }
        }
        // A dtype that does not exist, in odd spellings.
        10 => {
            if let Some(path) = random_node_path(rng, root, |j| matches!(j, Json::Str(_))) {
                let names = ["Q4", "f32", "F32 ", "", "F4", "BF16\u{0}", "U8", "I64"];
                *node_mut(root, &path) = Json::Str(rng.pick(&names).to_string());
            }
        }
        // The whole header replaced by another kind of JSON value.
        _ => {
            *root = match rng.below(4) {
                0 => Json::Arr(vec![num(1), num(2)]),
                1 => Json::Str("header".into()),
                2 => Json::Null,
                _ => Json::Num(nasty_number(rng, data_len)),
            };
        }
    }
}

/// One random edit of the rendered header text: escapes (valid, invalid, lone surrogates)
/// spliced in after a quote, or a stray structural character.
fn mutate_text(rng: &mut Rng, text: &mut String) {
    let quotes: Vec<usize> = text.match_indices('"').map(|(i, _)| i).collect();
    if quotes.is_empty() {
        return;
    }
    let at = *rng.pick(&quotes) + usize::from(rng.chance(1, 2));
    let splice = *rng.pick(&[
        "\\ud800",
        "\\udc00",
        "\\ud83e\\udd80",
        "\\u0000",
        "\\uZZZZ",
        "\\",
        "\\x41",
        "\"",
        ",",
        "}",
        "]",
        ":",
        "{",
        "[",
        "\u{0}",
        "\n",
    ]);
    text.insert_str(at, splice);
}

/// One random edit of the file's bytes.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) {
    match rng.below(7) {
        0 => {
            for _ in 0..=rng.below(4) {
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let keep = rng.below(bytes.len() + 1);
            bytes.truncate(keep);
        }
        2 => {
            let header_len = bytes
                .get(..8)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
            let available = bytes.len().saturating_sub(8) as u64;
            let choices = [
                0,
                1,
                available,
                available + 1,
                available.saturating_sub(1),
                header_len.wrapping_add(1),
                header_len.wrapping_sub(1),
                100 * 1024 * 1024,
                100 * 1024 * 1024 + 1,
                u64::MAX,
                u64::MAX - 7,
                1 << 63,
                rng.next_u64(),
            ];
            let value = *rng.pick(&choices);
            if bytes.len() < 8 {
                bytes.resize(8, 0);
            }
            bytes[..8].copy_from_slice(&value.to_le_bytes());
        }
        3 => {
            let at = rng.below(bytes.len() + 1);
            let extra: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next_u64() as u8).collect();
            bytes.splice(at..at, extra);
        }
        4 => {
            if !bytes.is_empty() {
                let at = rng.below(bytes.len());
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                bytes.drain(at..end);
            }
        }
        5 => {
            // Invalid UTF-8 inside the header.
            if bytes.len() > 8 {
                let i = 8 + rng.below(bytes.len() - 8);
                bytes[i] = *rng.pick(&[0x80, 0xc0, 0xff, 0xed, 0xf4]);
            }
        }
        _ => {
            // A short file.
            let keep = rng.below(9).min(bytes.len());
            bytes.truncate(keep);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------

/// What an accepted file must satisfy; `Err` says which rule broke.
fn check_accepted(bytes: &[u8], tensors: &[TensorInfo], data_start: usize) -> Result<(), String> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if data_start as u64 != 8 + header_len || data_start > bytes.len() {
        return Err(format!(
            "data_start {data_start} with header length {header_len} in {} bytes",
            bytes.len()
        ));
    }
    let data_len = bytes.len() - data_start;
    let mut names = HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(format!("tensor '{}' listed twice", t.name));
        }
        if t.begin > t.end || t.end > data_len {
            return Err(format!(
                "tensor '{}' [{}, {}) outside the {data_len}-byte buffer",
                t.name, t.begin, t.end
            ));
        }
        let expected = t
            .shape
            .iter()
            .try_fold(t.dtype.size() as u128, |acc, &d| acc.checked_mul(d as u128));
        if expected != Some((t.end - t.begin) as u128) {
            return Err(format!(
                "tensor '{}' {:?} {:?} spans {} bytes, expected {expected:?}",
                t.name,
                t.dtype,
                t.shape,
                t.end - t.begin
            ));
        }
        // numel() must not overflow either (callers size buffers with it).
        if t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(t.numel()) {
            return Err(format!("tensor '{}' numel overflows", t.name));
        }
    }
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|t| t.end > t.begin)
        .map(|t| (t.begin, t.end, t.name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(format!(
                "tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                pair[0].2, pair[0].0, pair[0].1, pair[1].2, pair[1].0, pair[1].1
            ));
        }
    }
    if tensors
        .windows(2)
        .any(|p| (p[0].begin, p[0].end) > (p[1].begin, p[1].end))
    {
        return Err("tensors are not in data-offset order".into());
    }
    Ok(())
}

fn describe(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(4096)];
    format!(
        "{} bytes: {:?}{}",
        bytes.len(),
        String::from_utf8_lossy(shown),
        if shown.len() < bytes.len() {
            " ..."
        } else {
            ""
        }
    )
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One iteration's file image, and whether it was damaged (one in eight is not).
fn image(seed: u64) -> (Vec<u8>, bool) {
    let mut rng = Rng(seed);
    let (mut header, data) = valid_image(&mut rng);
    let damaged = !rng.chance(1, 8);
    let (edit_json, edit_text, edit_bytes) = if damaged {
        loop {
            let picks = (rng.chance(3, 4), rng.chance(1, 6), rng.chance(1, 2));
            if picks.0 || picks.1 || picks.2 {
                break picks;
            }
        }
    } else {
        (false, false, false)
    };
    if edit_json {
        for _ in 0..=rng.below(3) {
            mutate_json(&mut rng, &mut header, data.len());
        }
    }
    let mut text = String::new();
    render(&header, &mut text);
    if edit_text {
        mutate_text(&mut rng, &mut text);
    }
    let pad = if rng.chance(1, 2) {
        (8 - (text.len() % 8)) % 8
    } else {
        0
    };
    let mut bytes = assemble(text.as_bytes(), pad, &data);
    if edit_bytes {
        for _ in 0..=rng.below(2) {
            mutate_bytes(&mut rng, &mut bytes);
        }
    }
    (bytes, damaged)
}

#[test]
fn parser_never_panics_and_accepts_only_safe_files() {
    let iterations = env_u64("QLORAKIT_FUZZ_ITERATIONS", DEFAULT_ITERATIONS);
    let base_seed = env_u64("QLORAKIT_FUZZ_SEED", DEFAULT_SEED);
    let path = Path::new("fuzz.safetensors");
    let (mut accepted, mut rejected, mut valid) = (0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for iteration in 0..iterations {
        let seed = base_seed.wrapping_add(iteration.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (bytes, damaged) = image(seed);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| parse(path, &bytes)));
        let problem = match outcome {
            Err(panic) => Some(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
            Ok(Ok((tensors, _metadata, data_start))) => {
                accepted += 1;
                check_accepted(&bytes, &tensors, data_start).err()
            }
            Ok(Err(err)) => {
                rejected += 1;
                let message = err.to_string();
                if !damaged {
                    Some(format!("rejected an undamaged file: {message}"))
                } else if !message.contains("fuzz.safetensors") || message.contains('\n') {
                    Some(format!(
                        "error does not name the file on one line: {message}"
                    ))
                } else {
                    None
                }
            }
        };
        if !damaged {
            valid += 1;
        }
        if let Some(problem) = problem {
            let repro = format!(
                "QLORAKIT_FUZZ_SEED={base_seed} QLORAKIT_FUZZ_ITERATIONS={}",
                iteration + 1
            );
            failures.push(format!(
                "iteration {iteration} ({repro}): {problem}\n  input {}",
                describe(&bytes)
            ));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "safetensors fuzz: {iterations} inputs, {accepted} accepted \
         ({valid} undamaged), {rejected} rejected"
    );
    // The generator must reach both sides, or the loop tests nothing.
    assert!(accepted > iterations / 10 && rejected > iterations / 3);
}

#[test]
fn undamaged_images_parse_to_what_was_written() {
    for iteration in 0..200u64 {
        let mut rng = Rng(DEFAULT_SEED ^ iteration);
        let (header, data) = valid_image(&mut rng);
        let mut text = String::new();
        render(&header, &mut text);
        let bytes = assemble(text.as_bytes(), 3, &data);
        let (tensors, metadata, data_start) =
            parse(Path::new("fuzz.safetensors"), &bytes).expect("a valid image parses");
        assert_eq!(data_start, 8 + text.len() + 3);
        let Json::Obj(entries) = &header else {
            unreachable!()
        };
        let expected_tensors = entries.iter().filter(|(k, _)| k != "__metadata__").count();
        assert_eq!(tensors.len(), expected_tensors);
        let has_metadata = entries.iter().any(|(k, _)| k == "__metadata__");
        assert_eq!(
            metadata.get("format").map(String::as_str),
            has_metadata.then_some("pt")
        );
        check_accepted(&bytes, &tensors, data_start).unwrap();
    }
}
