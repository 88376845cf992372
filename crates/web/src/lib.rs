//! The browser face of UniFusion-Web: wasm-bindgen exports over burn's WebGPU backend.
//!
//! This is the only crate that knows about wasm. It runs inside the page's module worker
//! (`web/worker.js`), owns that worker's one wgpu device (burn allows a single registration
//! per JS realm, so a lost device means a new worker) and hands plain JS values back; every
//! readback is `*_async`, since a synchronous read panics on the browser's WebGPU.
//!
//! - [`session`]: load a packed model (the one streaming loader) and run tasks on it.
//! - [`shard_source`]: shard bytes from a JS callback, one shard at a time.
//!
//! On native targets the crate is empty, so `cargo test --workspace` builds it for free.
#![cfg(target_family = "wasm")]

pub mod session;
pub mod shard_source;

use std::cell::RefCell;

use burn::tensor::Device;
use burn::tensor::wgpu::WgpuBackend;
use unifusion_kernels::selftest::{self, SelfTestShape};
use unifusion_model::precision::{Precision, precision_of, set_precision, supports_f16};
use wasm_bindgen::prelude::*;

thread_local! {
    static DEVICE: RefCell<Option<Device>> = const { RefCell::new(None) };
    /// burn's wgpu device handle, kept so a test can destroy it ([`lose_device`]).
    static WGPU_DEVICE: RefCell<Option<burn::tensor::wgpu::wgpu::Device>> = const { RefCell::new(None) };
}

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Initialises burn's WebGPU device once for this page and sets its compute precision;
/// returns the precision (`"f32"` or `"f16"`). Later calls are no-ops that return it again.
///
/// `precision`: `"auto"` (or absent) computes in f16 where the adapter has `shader-f16` (burn
/// requests every adapter feature for its device, so the device has it too) and in f32
/// elsewhere; `"f16"` is refused on an adapter without `shader-f16`; `"f32"` is always f32.
/// Call it (and await it) before anything else; do not race two calls.
#[wasm_bindgen(js_name = initDevice)]
pub async fn init_device(precision: Option<String>) -> Result<String, JsError> {
    if let Some(device) = DEVICE.with(|d| d.borrow().clone()) {
        return Ok(precision_of(&device).name().to_owned());
    }
    let (mut device, setup) = Device::wgpu_options()
        .graphics_api(WgpuBackend::WebGpu)
        .init_with_setup_async()
        .await
        .map_err(|e| JsError::new(&format!("WebGPU initialisation failed: {e}")))?;
    WGPU_DEVICE.with(|d| *d.borrow_mut() = Some(setup.device));
    let precision = match precision.as_deref().unwrap_or("auto") {
        "auto" => Precision::auto(supports_f16(&device)),
        "f32" => Precision::F32,
        "f16" => Precision::F16,
        other => {
            return Err(JsError::new(&format!(
                "precision must be \"auto\", \"f32\" or \"f16\", got {other:?}"
            )));
        }
    };
    set_precision(&mut device, precision).map_err(|e| JsError::new(&e.to_string()))?;
    DEVICE.with(|d| *d.borrow_mut() = Some(device));
    Ok(precision.name().to_owned())
}

/// Destroys the WebGPU device, as a driver reset or a GPU that went away would: the device's
/// `lost` callback fires (cubecl marks the device poisoned), and the next task fails with
/// "The device is poisoned", which the worker reports as `device-lost`. For tests of the
/// page's recovery; a page never calls it.
#[wasm_bindgen(js_name = loseDevice)]
pub fn lose_device() -> Result<(), JsError> {
    WGPU_DEVICE.with(|d| match d.borrow().as_ref() {
        Some(device) => {
            device.destroy();
            Ok(())
        }
        None => Err(JsError::new("call initDevice() first")),
    })
}

fn device() -> Result<Device, JsError> {
    DEVICE
        .with(|d| d.borrow().clone())
        .ok_or_else(|| JsError::new("call initDevice() first"))
}

/// Runs the device self-test (a matmul and the fused RMSNorm kernel beside its tensor-op
/// reference) and returns inputs and outputs as plain arrays for an independent check.
#[wasm_bindgen]
pub async fn selftest(rows: u32, cols: u32, out: u32) -> Result<JsValue, JsError> {
    let shape = SelfTestShape {
        rows: rows as usize,
        cols: cols as usize,
        out: out as usize,
    };
    if shape.rows == 0 || shape.cols == 0 || shape.out == 0 {
        return Err(JsError::new("selftest sizes must be positive"));
    }
    let report = selftest::run(&device()?, shape)
        .await
        .map_err(|e| JsError::new(&e))?;
    serde_wasm_bindgen::to_value(&report).map_err(|e| JsError::new(&e.to_string()))
}
