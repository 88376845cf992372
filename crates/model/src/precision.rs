//! Compute precision: f32 everywhere, or f16 weights and matmuls with f32 where f16 breaks.
//!
//! The precision is a property of the device, not of each call: burn 0.22 gives every device
//! a default float dtype ([`Device::configure`]), and every float tensor created without an
//! explicit dtype (`from_data`, `zeros`, `Int::float`, the loaders' uploads) takes it. So
//! [`set_precision`] before loading is all a caller does; the weights then arrive on the
//! device as f16 (half the memory) and every matmul, convolution and attention runs in f16.
//! burn does not promote mixed dtypes (a binary op reads both operands as the left one's
//! dtype), so code that needs f32 casts explicitly, at these places (measured in
//! `tests/precision.rs`):
//!
//! - RMSNorm, LayerNorm and GroupNorm statistics: `x²` overflows f16 (max 65504) once
//!   `|x| > 256`, and a mean over thousands of f16 terms loses the low bits. The norm runs in
//!   f32 ([`norm_in_f32`]), so the fused f32 WGSL RMSNorm kernel keeps running under f16.
//! - The int8/int4 Linear kernel (`unifusion_kernels::QuantLinear`) casts its input to f32:
//!   its weights are already 1 or ½ byte, so f16 would save nothing there.
//! - The sampler's latent state, the Euler update and CFG: the DiT takes and returns f32
//!   latents; only its inside is f16.
//! - The timestep embedding: `sin(1000·t·f)` needs f32 arguments (f16 spacing is 0.5 at 1000).
//! - RoPE tables are built on the host in f64/f32 and stored in the compute dtype (values in
//!   `[-1, 1]`, f16 spacing ≤ 2⁻¹¹).
//!
//! Whether a wgpu device has f16 is burn's `Device::supports_dtype`: cubecl-wgpu 0.11 registers
//! f16 arithmetic when the *adapter* has `SHADER_F16` and requests every adapter feature for the
//! devices it creates, so the two agree (browser and native alike). A wgpu device created
//! outside burn without `SHADER_F16` and handed over with `WgpuOptions::setup` would still be
//! reported as f16-capable; nothing here does that.

use burn::tensor::{DType, Device, DeviceError, FloatDType, Tensor};

/// The float dtype a model computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and arithmetic.
    F32,
    /// f16 weights, matmuls, convolutions and attention; norms, sampler state and timestep
    /// embedding in f32.
    F16,
}

impl Precision {
    /// The burn dtype.
    pub fn float_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// `"f32"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }

    /// The `auto` rule: f16 where the device can compute in it, else f32.
    pub fn auto(supports_f16: bool) -> Self {
        if supports_f16 {
            Precision::F16
        } else {
            Precision::F32
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a device cannot take a precision.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// The device has no f16 arithmetic (a WebGPU adapter without `shader-f16`).
    #[error(
        "this device cannot compute in f16 (its adapter lacks shader-f16); use f32 or auto instead"
    )]
    NoF16,
    /// Tensors already exist on the device in another precision.
    #[error(
        "cannot switch the device to {wanted}: it already computes in {current} (tensors were created on it first); choose the precision before loading a model"
    )]
    AlreadySet {
        /// What was asked for.
        wanted: Precision,
        /// The device's precision.
        current: Precision,
    },
    /// Any other refusal from burn.
    #[error("the device refused {precision}: {message}")]
    Device {
        /// What was asked for.
        precision: Precision,
        /// burn's reason.
        message: String,
    },
}

/// Whether `device` computes in f16 (storage and arithmetic; on wgpu: `shader-f16`).
pub fn supports_f16(device: &Device) -> bool {
    device.supports_dtype(FloatDType::F16)
}

/// Makes `precision` the default float dtype of `device` (every clone of it). Call it before
/// any tensor exists on the device; asking again for the precision it already has is fine.
/// F16 on a device without f16 arithmetic is refused ([`PrecisionError::NoF16`]), never
/// silently downgraded: [`Precision::auto`] is the rule that falls back.
pub fn set_precision(device: &mut Device, precision: Precision) -> Result<(), PrecisionError> {
    if precision == Precision::F16 && !supports_f16(device) {
        return Err(PrecisionError::NoF16);
    }
    match device.configure(precision.float_dtype()) {
        Ok(()) => Ok(()),
        Err(DeviceError::AlreadyInitialized { .. }) => match precision_of(device) {
            current if current == precision => Ok(()),
            current => Err(PrecisionError::AlreadySet {
                wanted: precision,
                current,
            }),
        },
        Err(e) => Err(PrecisionError::Device {
            precision,
            message: e.to_string(),
        }),
    }
}

/// The precision `device` computes in (its default float dtype; f32 for anything but f16).
pub fn precision_of(device: &Device) -> Precision {
    if device.settings().float_dtype == FloatDType::F16 {
        Precision::F16
    } else {
        Precision::F32
    }
}

/// Runs a norm in f32 and returns to `x`'s dtype: `f` gets `x` as f32 (parameters it uses
/// must be f32 too; see [`f32_param`]).
pub fn norm_in_f32<const D: usize>(
    x: Tensor<D>,
    f: impl FnOnce(Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    let dtype = x.dtype();
    let y = f(x.cast(FloatDType::F32));
    if dtype == DType::F32 {
        y
    } else {
        y.cast(dtype)
    }
}

/// A small parameter kept in f32 whatever the precision (norm scales and shifts: a few
/// hundred values each, read by f32 arithmetic).
pub fn f32_param<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.cast(FloatDType::F32)
}

/// `x` in f32 (sampler state and anything else that must not round to f16).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

/// `x` in `device`'s compute dtype.
pub fn to_compute<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.device().settings().float_dtype;
    x.cast(dtype)
}
