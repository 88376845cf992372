//! Hand-written WGSL kernels for UniFusion-Web.
//!
//! Every kernel has two faces with one signature: the fused WGSL kernel from `shaders/`, launched
//! on burn tensors through burn's `template` + `extension` features, and a plain-tensor
//! reference built from burn ops. [`rms_norm`] picks the kernel when the tensor lives on a wgpu
//! device (native Vulkan/lavapipe or the browser's WebGPU) and the reference everywhere else
//! (Flex CPU, autodiff graphs), so model code calls one function and stays backend-free.
//! [`QuantLinear`] does the same for Linear layers with block-wise int8/int4 weights
//! ([`dequant_matmul`]: `shaders/dequant_matvec.wgsl` and `shaders/dequant_matmul.wgsl`).
//!
//! The same WGSL text runs natively and in the browser; `tests/browser` checks it there.

pub mod dequant_matmul;
mod rms_norm;
pub mod selftest;

pub use dequant_matmul::{QuantKernelError, QuantLinear, dequant_matmul};
pub use rms_norm::{KernelError, rms_norm, rms_norm_fused, rms_norm_reference};
