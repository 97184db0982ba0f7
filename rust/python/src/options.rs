//! `QuantizeOptions`: the options of a checkpoint run, validated once, here.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;
use qlorakit_core::checkpoint::{Options, ERROR_SAMPLE_STRIDE};
use qlorakit_core::gptq::DEFAULT_DAMP;
use qlorakit_core::{Blocksize, QuantType, BLOCKSIZES};

/// How `quantize_checkpoint` quantizes: the 4-bit format, shards, threads, scale search,
/// GPTQ calibration.
/// Frozen; the constructor is the one validator of these options (``ValueError`` naming the
/// option).
#[pyclass(frozen, module = "qlorakit._core")]
pub struct QuantizeOptions {
    pub(crate) core: Options,
    pub(crate) threads: Option<usize>,
}

/// The text of `str(x)` / `repr(x)` (empty if that raised).
fn python_text(text: PyResult<Bound<'_, PyString>>) -> String {
    text.map_or_else(|_| String::new(), |t| t.to_string())
}

/// `x` as Python's `repr(float)` prints it (`0.01`, `1.0`, `nan`, `inf`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// `('nf4', 'fp4')`, as Python prints the tuple.
fn quant_type_names() -> String {
    let names: Vec<String> = QuantType::ALL
        .iter()
        .map(|t| format!("'{}'", t.name()))
        .collect();
    format!("({})", names.join(", "))
}

/// `(32, 64, ...)`, as Python prints the tuple.
fn blocksize_names() -> String {
    let sizes: Vec<String> = BLOCKSIZES.iter().map(usize::to_string).collect();
    format!("({})", sizes.join(", "))
}

#[pymethods]
impl QuantizeOptions {
    #[new]
    #[pyo3(signature = (*, quant_type, blocksize, double_quant, max_shard_bytes, threads=None, scale_search=false, importance=None, durable=true, hessians=None, gptq_damp=DEFAULT_DAMP))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        quant_type: &Bound<'_, PyAny>,
        blocksize: &Bound<'_, PyAny>,
        double_quant: bool,
        max_shard_bytes: u64,
        threads: Option<usize>,
        scale_search: bool,
        importance: Option<PathBuf>,
        durable: bool,
        hessians: Option<PathBuf>,
        gptq_damp: f64,
    ) -> PyResult<Self> {
        // The core parses both (one rule); this names the option in a ValueError.
        let given_quant_type = quant_type;
        let quant_type: QuantType = given_quant_type
            .extract::<String>()
            .ok()
            .and_then(|name| name.parse().ok())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "quant_type must be one of {}, got {}",
                    quant_type_names(),
                    python_text(given_quant_type.repr())
                ))
            })?;
        let given_blocksize = blocksize;
        let blocksize = given_blocksize
            .extract::<i64>()
            .ok()
            .and_then(|size| Blocksize::from_signed(size).ok())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "blocksize must be one of {}, got {}",
                    blocksize_names(),
                    python_text(given_blocksize.str())
                ))
            })?;
        if importance.is_some() && !scale_search {
            return Err(PyValueError::new_err(
                "importance weights only apply with scale_search=True (--scale-search)",
            ));
        }
        if !(gptq_damp.is_finite() && gptq_damp >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "gptq_damp must be finite and >= 0, got {}",
                python_float(gptq_damp)
            )));
        }
        Ok(QuantizeOptions {
            core: Options {
                quant_type,
                blocksize,
                double_quant,
                max_shard_bytes,
                error_sample_stride: ERROR_SAMPLE_STRIDE,
                scale_search,
                importance,
                hessians,
                gptq_damp,
                durable,
            },
            threads,
        })
    }

    #[getter]
    fn quant_type(&self) -> &'static str {
        self.core.quant_type.name()
    }

    #[getter]
    fn blocksize(&self) -> usize {
        self.core.blocksize.get()
    }

    #[getter]
    fn double_quant(&self) -> bool {
        self.core.double_quant
    }

    /// Largest output shard in bytes (a bigger single tensor gets a shard of its own).
    #[getter]
    fn max_shard_bytes(&self) -> u64 {
        self.core.max_shard_bytes
    }

    /// Worker threads (None: all cores).
    #[getter]
    fn threads(&self) -> Option<usize> {
        self.threads
    }

    #[getter]
    fn scale_search(&self) -> bool {
        self.core.scale_search
    }

    /// The importance file (safetensors) weighting the scale search, if any.
    #[getter]
    fn importance(&self) -> Option<String> {
        self.core
            .importance
            .as_ref()
            .map(|p| p.display().to_string())
    }

    /// Whether every shard is synced to disk before it counts as written.
    #[getter]
    fn durable(&self) -> bool {
        self.core.durable
    }

    /// The calibration Hessian file (safetensors) of GPTQ, if any.
    #[getter]
    fn hessians(&self) -> Option<String> {
        self.core.hessians.as_ref().map(|p| p.display().to_string())
    }

    /// GPTQ's relative damping of each Hessian (`damp * mean(diag(H))` on its diagonal).
    #[getter]
    fn gptq_damp(&self) -> f64 {
        self.core.gptq_damp
    }

    fn __repr__(&self) -> String {
        let py_bool = |b: bool| if b { "True" } else { "False" };
        let py_option = |v: Option<String>| v.unwrap_or_else(|| "None".into());
        format!(
            "QuantizeOptions(quant_type='{}', blocksize={}, double_quant={}, max_shard_bytes={}, \
             threads={}, scale_search={}, importance={}, durable={}, hessians={}, gptq_damp={})",
            self.quant_type(),
            self.blocksize(),
            py_bool(self.double_quant()),
            self.max_shard_bytes(),
            py_option(self.threads.map(|t| t.to_string())),
            py_bool(self.scale_search()),
            py_option(self.importance().map(|p| format!("{p:?}"))),
            py_bool(self.durable()),
            py_option(self.hessians().map(|p| format!("{p:?}"))),
            python_float(self.gptq_damp()),
        )
    }
}
