//! Picking a burn device, and its compute precision, from command-line flags.

use burn::tensor::{Device, DeviceKind};
use clap::ValueEnum;
use unifusion_model::precision::{Precision, set_precision, supports_f16};

use crate::CliError;

/// A backend the native tools can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's wgpu backend on the best adapter (lavapipe on a machine without a GPU).
    Wgpu,
    /// burn's pure-Rust CPU backend.
    Flex,
}

impl Backend {
    pub fn device(self) -> Device {
        match self {
            Backend::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
            Backend::Flex => Device::flex(),
        }
    }

    /// The device in the precision `wanted` asks for (before any tensor exists on it).
    pub fn device_with(self, wanted: PrecisionArg) -> Result<(Device, Precision), CliError> {
        let mut device = self.device();
        let precision = match wanted {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F16 => Precision::F16,
            // f16 only where it is a GPU's (wgpu with shader-f16): Flex computes f16 in
            // software, converting every element, which is slower than f32 on a CPU.
            PrecisionArg::Auto => Precision::auto(self == Backend::Wgpu && supports_f16(&device)),
        };
        set_precision(&mut device, precision)
            .map_err(|e| CliError::Usage(format!("--precision {}: {e}", wanted.name())))?;
        Ok((device, precision))
    }
}

/// `--precision`: what the model computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 weights and arithmetic.
    F32,
    /// f16 weights, matmuls and attention (norms, sampler state and timestep embedding stay
    /// f32); refused where the device has no f16 arithmetic.
    F16,
    /// f16 on a wgpu adapter with shader-f16, f32 otherwise (and always f32 on Flex).
    Auto,
}

impl PrecisionArg {
    fn name(self) -> &'static str {
        match self {
            PrecisionArg::F32 => "f32",
            PrecisionArg::F16 => "f16",
            PrecisionArg::Auto => "auto",
        }
    }
}
