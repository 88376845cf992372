//! Picking a burn device from a command-line flag.

use burn::tensor::{Device, DeviceKind};
use clap::ValueEnum;

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
}
