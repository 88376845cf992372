//! Picking a burn device, and its compute precision, from command-line flags.

use burn::tensor::{Device, DeviceKind};
use std::sync::OnceLock;

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
    /// The device; for wgpu only once an adapter is known to exist (burn's own device setup
    /// panics on a machine without one).
    pub fn device(self) -> Result<Device, CliError> {
        match self {
            Backend::Wgpu => {
                require_wgpu_adapter()?;
                Ok(Device::wgpu(DeviceKind::DefaultDevice))
            }
            Backend::Flex => Ok(Device::flex()),
        }
    }

    /// The device in the precision `wanted` asks for (before any tensor exists on it).
    pub fn device_with(self, wanted: PrecisionArg) -> Result<(Device, Precision), CliError> {
        let mut device = self.device()?;
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

/// Asks wgpu for an adapter on any of its native APIs, as burn's default device does, and
/// refuses with a clear error where there is none, e.g. a
/// GPU machine whose Vulkan driver is not installed. Asked once per process.
pub fn require_wgpu_adapter() -> Result<(), CliError> {
    use burn::tensor::wgpu::wgpu;
    static ADAPTER: OnceLock<Result<(), String>> = OnceLock::new();
    ADAPTER
        .get_or_init(|| {
            let instance =
                wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
            pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| {
            CliError::Device(format!(
                "no wgpu adapter on this machine ({e}); install a Vulkan driver \
                 (mesa-vulkan-drivers gives a CPU one) or use --backend flex"
            ))
        })
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
