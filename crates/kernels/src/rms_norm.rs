//! Fused RMSNorm over the last axis: `y = x / sqrt(mean(x²) + eps) * weight`.
//!
//! Kernel: `shaders/rms_norm.wgsl` (one workgroup per row, workgroup-memory reduction).
//! Reference: [`rms_norm_reference`], four burn tensor ops.

use burn::backend::Wgpu;
use burn::backend::wgpu::{
    CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::tensor::{DType, Tensor};
use cubecl::CubeCount;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;

/// Threads per workgroup. A power of two for the tree reduction.
const WORKGROUP_SIZE: u32 = 128;
/// Fewest threads that share one row.
const MIN_ROW_THREADS: u32 = 8;
/// WebGPU's guaranteed `maxComputeWorkgroupsPerDimension`.
const MAX_GRID_X: usize = 65_535;

/// Why a fused kernel could not run on the given tensors.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The tensor does not live on a wgpu device (Flex, autodiff, ...).
    #[error("tensor is not on a wgpu device")]
    NotWgpu,
    /// The kernel is written for f32 only.
    #[error("the fused kernel takes f32, got {0:?}")]
    UnsupportedDType(DType),
    /// Weight length differs from the normalised axis.
    #[error("weight has {weight} elements but the last axis has {cols}")]
    ShapeMismatch { weight: usize, cols: usize },
}

/// RMSNorm over the last axis, by the fused WGSL kernel on wgpu devices, by
/// [`rms_norm_reference`] anywhere else.
///
/// `x`: `[..., cols]`, `weight`: `[cols]`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f32) -> Tensor<D> {
    match rms_norm_fused(x.clone(), weight.clone(), eps) {
        Ok(y) => y,
        Err(_) => rms_norm_reference(x, weight, eps),
    }
}

/// The plain-tensor reference: `x * rsqrt(mean(x², -1) + eps) * weight`.
pub fn rms_norm_reference<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f32) -> Tensor<D> {
    let inv_rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    x * inv_rms * weight.unsqueeze::<D>()
}

/// The fused WGSL kernel, or why it cannot run on these tensors.
pub fn rms_norm_fused<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    eps: f32,
) -> Result<Tensor<D>, KernelError> {
    let dtype = x.dtype();
    if dtype != DType::F32 || weight.dtype() != DType::F32 {
        return Err(KernelError::UnsupportedDType(dtype));
    }
    let cols = x.dims()[D - 1];
    fused_with_row_threads(x, weight, eps, row_threads(cols))
}

fn fused_with_row_threads<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    eps: f32,
    row_threads: u32,
) -> Result<Tensor<D>, KernelError> {
    let x = x
        .try_into_primitive::<Wgpu>()
        .map_err(|_| KernelError::NotWgpu)?;
    let weight = weight
        .try_into_primitive::<Wgpu>()
        .map_err(|_| KernelError::NotWgpu)?;
    Ok(Tensor::from_primitive::<Wgpu>(launch(
        x,
        weight,
        eps,
        row_threads,
    )?))
}

/// Threads per row: about one per 8 elements, a power of two in `MIN_ROW_THREADS..=WORKGROUP_SIZE`.
/// Measured on lavapipe (`unifusion bench kernels`): one 128-thread workgroup per 128-wide row
/// ran 6× slower than the tensor-op reference; 16 threads per row removes the idle threads.
fn row_threads(cols: usize) -> u32 {
    let wanted = cols.div_ceil(8).next_power_of_two();
    (wanted as u32).clamp(MIN_ROW_THREADS, WORKGROUP_SIZE)
}

struct RmsNormKernel {
    row_threads: u32,
}

impl KernelSource for RmsNormKernel {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(include_str!("../../../shaders/rms_norm.wgsl"))
            .register("workgroup_size", WORKGROUP_SIZE.to_string())
            .register("row_threads", self.row_threads.to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((WORKGROUP_SIZE, self.row_threads))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

fn launch(
    x: CubeTensor,
    weight: CubeTensor,
    eps: f32,
    row_threads: u32,
) -> Result<CubeTensor, KernelError> {
    x.assert_is_on_same_device(&weight);
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);

    let shape = x.meta.shape().clone();
    let cols = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / cols.max(1);
    let weight_len = weight.meta.shape().num_elements();
    if weight_len != cols {
        return Err(KernelError::ShapeMismatch {
            weight: weight_len,
            cols,
        });
    }

    let buffer = x.client.empty(shape.num_elements() * DType::F32.size());
    let output = CubeTensor::new_contiguous(
        x.client.clone(),
        x.device.clone(),
        shape,
        buffer,
        DType::F32,
    );
    if rows == 0 || cols == 0 {
        return Ok(output);
    }

    let info = [rows as u32, cols as u32, eps.to_bits()];
    let info = x.client.create_from_slice(bytemuck::cast_slice(&info));
    let groups = rows.div_ceil((WORKGROUP_SIZE / row_threads) as usize);
    let grid_x = groups.min(MAX_GRID_X);
    let grid_y = groups.div_ceil(MAX_GRID_X);
    let cube_dim = CubeDim::new_1d(WORKGROUP_SIZE);

    x.client.launch(
        Box::new(SourceKernel::new(RmsNormKernel { row_threads }, cube_dim)),
        CubeCount::Static(grid_x as u32, grid_y as u32, 1),
        KernelArguments::new().with_buffers(vec![
            x.handle.binding(),
            weight.handle.binding(),
            output.handle.clone().binding(),
            info.binding(),
        ]),
    );
    Ok(output)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, DeviceKind, TensorData};

    use super::*;
    use crate::selftest::fixture_values;

    fn wgpu() -> Device {
        Device::wgpu(DeviceKind::DefaultDevice)
    }

    /// RMSNorm in f64, the ground truth both paths are held to.
    fn rms_f64(x: &[f32], weight: &[f32], cols: usize, eps: f32) -> Vec<f32> {
        x.chunks(cols)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                row.iter()
                    .zip(weight)
                    .map(move |(&v, &w)| (v as f64 * inv * w as f64) as f32)
            })
            .collect()
    }

    fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let tol = 1e-6 + 1e-5 * e.abs();
            assert!(
                (a - e).abs() <= tol,
                "{what}: element {i}: got {a}, want {e} (±{tol})"
            );
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().expect("f32 tensor")
    }

    fn fixture<const D: usize>(shape: [usize; D], device: &Device) -> (Tensor<D>, Tensor<1>) {
        let n: usize = shape.iter().product();
        let cols = shape[D - 1];
        let x = Tensor::from_data(TensorData::new(fixture_values(7, n), shape), device);
        let w = Tensor::from_data(TensorData::new(fixture_values(8, cols), [cols]), device);
        (x, w)
    }

    fn check_fused<const D: usize>(shape: [usize; D]) {
        let device = wgpu();
        let (x, w) = fixture(shape, &device);
        let expected = rms_f64(&values(x.clone()), &values(w.clone()), shape[D - 1], 1e-6);
        let fused =
            rms_norm_fused(x.clone(), w.clone(), 1e-6).expect("wgpu tensors take the kernel");
        assert_close(&values(fused), &expected, &format!("fused {shape:?}"));
        let reference = rms_norm_reference(x, w, 1e-6);
        assert_close(
            &values(reference),
            &expected,
            &format!("reference {shape:?}"),
        );
    }

    #[test]
    fn fused_kernel_matches_f64_on_wgpu() {
        check_fused([37, 300]); // several strided passes per thread
        check_fused([33, 16]); // 8 threads per row, 16 rows per workgroup, a partial last group
        check_fused([9, 100]); // 16 threads per row
        check_fused([1, 1]);
        check_fused([4, 128]); // exactly one pass
        check_fused([3, 5, 4096]);
        check_fused([2, 3, 129]);
    }

    #[test]
    fn fused_kernel_spans_more_rows_than_one_grid_axis() {
        // One row per workgroup, forced, so 70000 groups spill into the grid's y axis (a natural
        // shape that does so needs 256 MB, past lavapipe's 128 MiB binding limit).
        let device = wgpu();
        let (x, w) = fixture([70_000, 3], &device);
        let expected = rms_f64(&values(x.clone()), &values(w.clone()), 3, 1e-6);
        let fused = fused_with_row_threads(x, w, 1e-6, WORKGROUP_SIZE).expect("kernel");
        assert_close(&values(fused), &expected, "70000 groups");
    }

    #[test]
    fn fused_kernel_reads_non_contiguous_input() {
        let device = wgpu();
        let (x, _) = fixture([64, 33], &device);
        let xt = x.swap_dims(0, 1); // [33, 64], strided
        let w = Tensor::from_data(TensorData::new(fixture_values(9, 64), [64]), &device);
        let expected = rms_f64(&values(xt.clone()), &values(w.clone()), 64, 1e-5);
        let fused = rms_norm_fused(xt, w, 1e-5).expect("kernel");
        assert_close(&values(fused), &expected, "transposed");
    }

    #[test]
    fn weight_of_the_wrong_length_is_an_error() {
        let device = wgpu();
        let (x, _) = fixture([4, 10], &device);
        let w = Tensor::<1>::ones([9], &device);
        let err = rms_norm_fused(x, w, 1e-6).expect_err("mismatch");
        assert!(
            matches!(
                err,
                KernelError::ShapeMismatch {
                    weight: 9,
                    cols: 10
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn flex_uses_the_reference() {
        let device = Device::flex();
        let (x, w) = fixture([5, 77], &device);
        let expected = rms_f64(&values(x.clone()), &values(w.clone()), 77, 1e-6);
        let err = rms_norm_fused(x.clone(), w.clone(), 1e-6).expect_err("no kernel on Flex");
        assert!(matches!(err, KernelError::NotWgpu), "{err}");
        assert_close(&values(rms_norm(x, w, 1e-6)), &expected, "flex");
    }
}
