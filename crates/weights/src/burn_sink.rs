//! A [`TensorSink`] that builds burn [`TensorData`]: floats (F64/F32/F16/BF16) become the
//! requested float dtype, integers keep theirs. The model helpers map names to modules.

use burn::tensor::{DType, TensorData};

use crate::dtype::{Dtype, convert_float};
use crate::loader::TensorSink;

/// A tensor the burn sink cannot represent.
#[derive(Debug, thiserror::Error)]
pub enum BurnSinkError {
    #[error("dtype {0} has no burn equivalent here")]
    Unsupported(Dtype),
    #[error("{0}")]
    Data(String),
}

/// Collects every tensor as [`TensorData`], in load order.
#[derive(Debug)]
pub struct TensorDataSink {
    /// Float tensors are converted to this (`F32`, `F16` or `BF16`).
    pub float: Dtype,
    pub tensors: Vec<(String, TensorData)>,
}

impl TensorDataSink {
    /// A sink converting floats to `float` (F64, F32, F16 or BF16).
    pub fn new(float: Dtype) -> Result<TensorDataSink, BurnSinkError> {
        if !float.is_convertible_float() {
            return Err(BurnSinkError::Unsupported(float));
        }
        Ok(TensorDataSink {
            float,
            tensors: Vec::new(),
        })
    }
}

/// Builds one [`TensorData`], converting floats to `float`.
pub fn tensor_data(
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
    float: Dtype,
) -> Result<TensorData, BurnSinkError> {
    let (bytes, dtype) = if dtype.is_convertible_float() {
        let converted = convert_float(bytes, dtype, float).ok_or_else(|| {
            BurnSinkError::Data(format!(
                "{} bytes is not whole {dtype} elements",
                bytes.len()
            ))
        })?;
        (converted, float)
    } else {
        (bytes.to_vec(), dtype)
    };
    let burn_dtype = match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U64 => DType::U64,
        Dtype::U32 => DType::U32,
        Dtype::U16 => DType::U16,
        Dtype::U8 => DType::U8,
        Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => {
            return Err(BurnSinkError::Unsupported(dtype));
        }
    };
    TensorData::try_from_bytes_vec(bytes, shape.to_vec(), burn_dtype)
        .map_err(|e| BurnSinkError::Data(format!("{e:?}")))
}

impl TensorSink for TensorDataSink {
    type Error = BurnSinkError;
    fn tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), BurnSinkError> {
        let data = tensor_data(dtype, shape, bytes, self.float)?;
        self.tensors.push((name.to_owned(), data));
        Ok(())
    }
}
