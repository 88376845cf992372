//! Checkpoint names for the parameters of a module the model crate built.
//!
//! The model crate builds every module with a `load` function that asks a source for tensors
//! by checkpoint name (diffusers / transformers names, PyTorch shapes). Training needs the
//! reverse: the trained module's parameters under those names, so the model crate's own
//! loaders read the result and inference needs no change. burn's module tree does not carry
//! the names, so [`NamedParams::discover`] builds the module once from seeded random tensors
//! (every value distinct) and finds each visited parameter among the recorded tensors by
//! value: as stored, or transposed (burn keeps `Linear` weights as `[in, out]`).
//!
//! Visit order is the module's field order, the same for every build with one config, so
//! the table maps visit index → name for every later module of that config.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use unifusion_model::generator::params::{LoadError, ParamSource, RandomInit};

use crate::TrainError;

/// `(name, PyTorch shape, values)` of checkpoint tensors.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Records every tensor a loader asks for, drawing it from a seeded random source.
pub struct Recorder {
    inner: RandomInit,
    /// What the loader took, in order.
    pub tensors: NamedTensors,
}

impl Recorder {
    /// Unit-variance values (distinct with probability 1) from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: RandomInit::new(seed, 1.0),
            tensors: Vec::new(),
        }
    }
}

impl ParamSource for Recorder {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let t = self.inner.tensor(name, shape, device)?;
        let values = t
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| LoadError::Format(format!("{e:?}")))?;
        self.tensors
            .push((name.to_string(), shape.to_vec(), values));
        Ok(t)
    }
}

/// One parameter's checkpoint name and layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamName {
    /// Checkpoint name, e.g. `decoder.layers.0.weight`.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// burn holds it as the transpose of the PyTorch `[out, in…]` matrix (`Linear` weights,
    /// the vision tower's patch projection).
    pub transposed: bool,
}

/// Visit index → checkpoint name, for every float parameter of one module layout.
#[derive(Clone, Debug)]
pub struct NamedParams {
    /// In visit order.
    pub entries: Vec<ParamName>,
}

fn values_of<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// A PyTorch weight as a matrix: `[out, in·k·k…]` (a conv kernel flattened as burn's
/// patch-projection matrices hold it, transposed).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let r = shape.first().copied().unwrap_or(1);
    (r, shape.iter().skip(1).product())
}

/// `[rows, cols]` row-major → its transpose.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

struct Collect {
    params: Vec<(Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.params.push((t.dims().to_vec(), values_of(&t)));
    }
}

struct Ids(Vec<u64>);

impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.id.val());
    }
}

/// Replaces each float parameter (in visit order) by `values[i]` (burn layout), optionally
/// giving it id `ids[i]`, keeping whether it trains.
struct Replace {
    values: Vec<Vec<f32>>,
    ids: Option<Vec<u64>>,
    index: usize,
}

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let (id, tensor, mapper) = param.consume();
        let device = tensor.device();
        let dims = tensor.dims();
        let grad = tensor.is_require_grad();
        let values = std::mem::take(&mut self.values[i]);
        let mut new = Tensor::<D>::from_data(TensorData::new(values, dims), &device);
        if grad {
            new = new.require_grad();
        }
        let id = match &self.ids {
            Some(ids) => ParamId::from(ids[i]),
            None => id,
        };
        Param::from_mapped_value(id, new, mapper)
    }
}

impl NamedParams {
    /// Matches the parameters of `module` (built from `recorded`) to the recorded tensors.
    /// Fails naming a parameter that matches none (a loader that changes values beyond a
    /// transpose) or a recorded tensor no parameter took.
    pub fn discover<M: Module>(module: &M, recorded: &NamedTensors) -> Result<Self, TrainError> {
        let mut by_first: HashMap<u32, Vec<usize>> = HashMap::new();
        for (k, (_, _, v)) in recorded.iter().enumerate() {
            if let Some(x) = v.first() {
                by_first.entry(x.to_bits()).or_default().push(k);
            }
        }
        let mut collect = Collect { params: Vec::new() };
        module.visit(&mut collect);
        let mut used = vec![false; recorded.len()];
        let mut entries = Vec::new();
        for (i, (dims, values)) in collect.params.iter().enumerate() {
            let first = values.first().map(|x| x.to_bits()).unwrap_or(0);
            let found = by_first.get(&first).into_iter().flatten().find_map(|&k| {
                let (name, shape, rec) = &recorded[k];
                if used[k] || rec.len() != values.len() {
                    return None;
                }
                if rec == values {
                    return Some((k, name, shape, false));
                }
                let (r, c) = rows_cols(shape);
                if shape.len() >= 2 && dims[..] == [c, r] && transpose(rec, r, c) == *values {
                    return Some((k, name, shape, true));
                }
                None
            });
            let Some((k, name, shape, transposed)) = found else {
                return Err(TrainError::Model(format!(
                    "parameter #{i} (shape {dims:?}) matches no checkpoint tensor"
                )));
            };
            used[k] = true;
            entries.push(ParamName {
                name: name.clone(),
                shape: shape.clone(),
                transposed,
            });
        }
        if let Some(k) = used.iter().position(|u| !u) {
            return Err(TrainError::Model(format!(
                "checkpoint tensor `{}` is not a parameter of the module",
                recorded[k].0
            )));
        }
        Ok(Self { entries })
    }

    /// Every parameter under its checkpoint name, PyTorch layout.
    pub fn export<M: Module>(&self, module: &M) -> NamedTensors {
        let mut collect = Collect { params: Vec::new() };
        module.visit(&mut collect);
        self.entries
            .iter()
            .zip(collect.params)
            .map(|(e, (_, values))| {
                let values = if e.transposed {
                    let (r, c) = rows_cols(&e.shape);
                    transpose(&values, c, r)
                } else {
                    values
                };
                (e.name.clone(), e.shape.clone(), values)
            })
            .collect()
    }

    /// `module` with every parameter set from `tensors` (PyTorch layout, by name); with
    /// `ids`, the parameters also take those ids (so a saved optimizer state applies again).
    pub fn import<M: Module>(
        &self,
        module: M,
        tensors: &BTreeMap<String, Vec<f32>>,
        ids: Option<Vec<u64>>,
    ) -> Result<M, TrainError> {
        let mut values = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let v = tensors
                .get(&e.name)
                .ok_or_else(|| TrainError::Checkpoint(format!("missing tensor `{}`", e.name)))?;
            if v.len() != e.shape.iter().product::<usize>() {
                return Err(TrainError::Checkpoint(format!(
                    "tensor `{}` has {} values, the config needs shape {:?}",
                    e.name,
                    v.len(),
                    e.shape
                )));
            }
            values.push(if e.transposed {
                let (r, c) = rows_cols(&e.shape);
                transpose(v, r, c)
            } else {
                v.clone()
            });
        }
        if let Some(ids) = &ids
            && ids.len() != values.len()
        {
            return Err(TrainError::Checkpoint(format!(
                "{} parameter ids for {} parameters",
                ids.len(),
                values.len()
            )));
        }
        Ok(module.map(&mut Replace {
            values,
            ids,
            index: 0,
        }))
    }

    /// `module` re-initialised: `init(entry)` gives each parameter's values in PyTorch layout.
    pub fn init<M: Module>(
        &self,
        module: M,
        mut init: impl FnMut(&ParamName) -> Vec<f32>,
    ) -> Result<M, TrainError> {
        let tensors = self
            .entries
            .iter()
            .map(|e| (e.name.clone(), init(e)))
            .collect();
        self.import(module, &tensors, None)
    }

    /// Parameter ids in visit order (saved with a checkpoint).
    pub fn ids<M: Module>(module: &M) -> Vec<u64> {
        let mut ids = Ids(Vec::new());
        module.visit(&mut ids);
        ids.0
    }
}

/// How a parameter starts, by its checkpoint name (the usual PyTorch conventions).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros (biases, `(1 + scale)` norms, zero-init output layers).
    Zeros,
    /// All ones (plain norms).
    Ones,
    /// Every value this constant (layer scales, mean pooling).
    Const(f32),
    /// Normal with this standard deviation.
    Normal(f32),
}

impl Init {
    /// The values for `shape`, drawn from `rng` for [`Init::Normal`].
    pub fn values(
        self,
        shape: &[usize],
        rng: &mut unifusion_model::generator::sampler::SeededNormal,
    ) -> Vec<f32> {
        let n = shape.iter().product();
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Const(c) => vec![c; n],
            Init::Normal(std) => (0..n).map(|_| rng.next_f32() * std).collect(),
        }
    }

    /// `1 / sqrt(fan_in)` for a PyTorch weight shape (`[out, in, k, k]` or `[out, in]`).
    pub fn fan_in(shape: &[usize]) -> Init {
        let fan_in: usize = shape.iter().skip(1).product();
        Init::Normal(1.0 / (fan_in.max(1) as f32).sqrt())
    }
}

/// The module's tensors as a safetensors file (f32).
pub fn safetensors_bytes(tensors: &NamedTensors) -> Result<Vec<u8>, TrainError> {
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&buffers)
        .map(|((name, shape, _), bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| TrainError::Checkpoint(format!("safetensors `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| TrainError::Checkpoint(e.to_string()))
}

/// A safetensors file's f32 tensors by name.
pub fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Vec<f32>>, TrainError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(TrainError::Checkpoint(format!(
                "tensor `{name}` is {:?}, checkpoints are f32",
                view.dtype()
            )));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, values);
    }
    Ok(out)
}
