//! The training loop shared by every stage: AdamW with linear warmup and cosine decay,
//! gradient clipping, checkpoints (named safetensors weights, the optimizer state, the step),
//! exact resume, a progress callback, and the loss curve.
//!
//! A stage draws its batch for step `k` from `(seed, k)` alone, so a run resumed from a
//! checkpoint at step `k` continues with the same batches, optimizer state and parameter ids
//! as the uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::curve::LossCurve;
use crate::named::{NamedParams, NamedTensors, read_safetensors, safetensors_bytes};

/// Optimizer and schedule of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    pub final_lr_fraction: f64,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Gradient-norm clip.
    pub clip_norm: f32,
}

impl OptimConfig {
    /// The learning rate of step `k` (0-based).
    pub fn lr_at(&self, k: usize) -> f64 {
        if k < self.warmup {
            return self.lr * (k + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let p = ((k - self.warmup) as f64 / span).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        self.lr * (self.final_lr_fraction + (1.0 - self.final_lr_fraction) * cos)
    }
}

/// An exponential moving average of the parameters, kept on the host under checkpoint names.
///
/// Updated every `every` steps from the end of warmup on, with the decay raised to `every`, so
/// its horizon is about `1 / (1 - decay)` steps whatever `every` is.
struct Ema {
    decay: f64,
    every: usize,
    /// `None` until the first update, which copies the parameters.
    tensors: Option<NamedTensors>,
}

impl Ema {
    fn update(&mut self, current: NamedTensors) {
        let Some(avg) = self.tensors.as_mut() else {
            self.tensors = Some(current);
            return;
        };
        let d = self.decay.powi(self.every as i32) as f32;
        for ((_, _, a), (_, _, c)) in avg.iter_mut().zip(current) {
            for (a, c) in a.iter_mut().zip(c) {
                *a = d * *a + (1.0 - d) * c;
            }
        }
    }
}

/// A module being trained: the module, its checkpoint names and its optimizer.
pub struct Trainable<M: Module> {
    model: Option<M>,
    /// Checkpoint names of the module's parameters.
    pub names: NamedParams,
    optim: ModuleOptimizer,
    /// The schedule.
    pub config: OptimConfig,
    ema: Option<Ema>,
}

impl<M: Module> Trainable<M> {
    /// Wraps a freshly initialised module (on an autodiff device).
    pub fn new(model: M, names: NamedParams, config: OptimConfig) -> Self {
        let optim = AdamWConfig::new()
            .with_weight_decay(config.weight_decay)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(config.clip_norm)))
            .init();
        Self {
            model: Some(model),
            names,
            optim,
            config,
            ema: None,
        }
    }

    /// Also keeps an exponential moving average of the parameters (decay per step, updated
    /// every `every` steps after warmup); [`Trainable::averaged`] exports it. A decay of 0
    /// keeps none.
    pub fn with_ema(mut self, decay: f64, every: usize) -> Self {
        self.ema = (decay > 0.0).then_some(Ema {
            decay,
            every: every.max(1),
            tensors: None,
        });
        self
    }

    /// The averaged parameters under checkpoint names, or the current ones where no average is
    /// kept (or none was taken yet).
    pub fn averaged(&self) -> NamedTensors {
        match self.ema.as_ref().and_then(|e| e.tensors.clone()) {
            Some(t) => t,
            None => self.names.export(self.model()),
        }
    }

    /// The module.
    pub fn model(&self) -> &M {
        self.model
            .as_ref()
            .unwrap_or_else(|| unreachable!("the model is only taken inside `apply`"))
    }

    /// Backward pass of `loss` and one AdamW step at the scheduled rate of step `k`; returns
    /// the loss value and the rate.
    pub fn apply(&mut self, loss: Tensor<1>, k: usize) -> Result<(f32, f64), TrainError> {
        let value = scalar(&loss)?;
        if !value.is_finite() {
            return Err(TrainError::Diverged { step: k + 1, value });
        }
        let grads = GradientsParams::from_grads(loss.backward(), self.model());
        self.apply_grads(grads, value, k)
    }

    /// One AdamW step `k` on a batch split into `shards` parts: `loss(module, shard)` is the
    /// shard's share of the batch loss (scaled so the shares add up to it). One shard runs
    /// here on the module itself, exactly as [`Trainable::apply`]; several run on threads of
    /// their own, each on a copy forked onto `device` (`Module::fork`: the same parameter ids,
    /// a separate autodiff graph, so no thread waits on another's graph lock), and their
    /// gradients are summed in shard order, so the result does not depend on thread timing.
    ///
    /// On this 2-core machine the ops of one small batch keep about 1.2 cores busy; the
    /// shards fill the rest (docs/BENCHMARKS.md, "Training steps").
    pub fn sharded_step<F>(
        &mut self,
        device: &Device,
        k: usize,
        shards: usize,
        loss: F,
    ) -> Result<(f32, f64), TrainError>
    where
        F: Fn(&M, usize) -> Result<Tensor<1>, TrainError> + Sync,
    {
        if shards <= 1 {
            let l = loss(self.model(), 0)?;
            return self.apply(l, k);
        }
        let model = self.model();
        let loss = &loss;
        let results: Vec<Result<(GradientsParams, f32), TrainError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..shards)
                .map(|shard| {
                    let copy = model.clone().fork(device);
                    s.spawn(move || {
                        let l = loss(&copy, shard)?;
                        let value = scalar(&l)?;
                        Ok((GradientsParams::from_grads(l.backward(), &copy), value))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TrainError::Model("a shard thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut sum = GradientsAccumulator::<M>::new();
        let mut value = 0.0;
        for r in results {
            let (grads, v) = r?;
            sum.accumulate(model, grads);
            value += v;
        }
        self.apply_grads(sum.grads(), value, k)
    }

    /// One AdamW step at the scheduled rate of step `k` with gradients computed elsewhere
    /// (keyed by the module's parameter ids, e.g. summed over the shards of a batch); `value`
    /// is the step's loss, returned with the rate.
    pub fn apply_grads(
        &mut self,
        grads: GradientsParams,
        value: f32,
        k: usize,
    ) -> Result<(f32, f64), TrainError> {
        if !value.is_finite() {
            return Err(TrainError::Diverged { step: k + 1, value });
        }
        let model = self
            .model
            .take()
            .unwrap_or_else(|| unreachable!("the model is present between steps"));
        let lr = self.config.lr_at(k);
        self.model = Some(self.optim.step(lr, model, grads));
        if let Some(mut ema) = self.ema.take() {
            let after_warmup = (k + 1).checked_sub(self.config.warmup);
            if after_warmup.is_some_and(|n| n.is_multiple_of(ema.every)) {
                ema.update(self.names.export(self.model()));
            }
            self.ema = Some(ema);
        }
        Ok((value, lr))
    }

    /// Writes `weights.safetensors` (checkpoint names), `optimizer.bpk` and, with an average
    /// taken, `ema.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<Vec<u64>, TrainError> {
        let bytes = safetensors_bytes(&self.names.export(self.model()))?;
        write_atomic(&dir.join("weights.safetensors"), &bytes)?;
        if let Some(avg) = self.ema.as_ref().and_then(|e| e.tensors.as_ref()) {
            write_atomic(&dir.join("ema.safetensors"), &safetensors_bytes(avg)?)?;
        }
        self.optim
            .save(dir.join("optimizer.bpk"))
            .map_err(|e| TrainError::Checkpoint(format!("optimizer state: {e:?}")))?;
        Ok(NamedParams::ids(self.model()))
    }

    /// Restores what [`Trainable::save`] wrote; `ids` are the parameter ids saved with it.
    pub fn load(&mut self, dir: &Path, ids: Vec<u64>) -> Result<(), TrainError> {
        let path = dir.join("weights.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        let tensors = read_safetensors(&bytes)?;
        let model = self
            .model
            .take()
            .unwrap_or_else(|| unreachable!("the model is present between steps"));
        self.model = Some(self.names.import(model, &tensors, Some(ids))?);
        if self.ema.is_some() {
            let avg = self.read_average(&dir.join("ema.safetensors"))?;
            if let Some(ema) = self.ema.as_mut() {
                ema.tensors = avg;
            }
        }
        let optim = std::mem::replace(&mut self.optim, AdamWConfig::new().init());
        self.optim = optim
            .load(dir.join("optimizer.bpk"))
            .map_err(|e| TrainError::Checkpoint(format!("optimizer state: {e:?}")))?;
        Ok(())
    }

    /// The average a checkpoint saved at `path`, in the module's order; `None` where it holds
    /// none (a run stopped before warmup ended).
    fn read_average(&self, path: &Path) -> Result<Option<NamedTensors>, TrainError> {
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let mut saved = read_safetensors(&bytes)?;
        let mut avg = self.names.export(self.model());
        for (name, _, values) in &mut avg {
            match saved.remove(name.as_str()) {
                Some(v) if v.len() == values.len() => *values = v,
                _ => {
                    return Err(TrainError::Checkpoint(format!(
                        "{} lacks `{name}` or holds it in another size",
                        path.display()
                    )));
                }
            }
        }
        Ok(Some(avg))
    }

    /// The module's tensors under checkpoint names, as safetensors bytes.
    pub fn export(&self) -> Result<Vec<u8>, TrainError> {
        safetensors_bytes(&self.names.export(self.model()))
    }

    /// Loads trained tensors by name (no optimizer state), e.g. a finished stage's weights.
    pub fn import(&mut self, tensors: &BTreeMap<String, Vec<f32>>) -> Result<(), TrainError> {
        let model = self
            .model
            .take()
            .unwrap_or_else(|| unreachable!("the model is present between steps"));
        self.model = Some(self.names.import(model, tensors, None)?);
        Ok(())
    }

    /// [`Trainable::import`] of a safetensors file (checkpoint names); an unreadable file or
    /// one that does not fit the module is an error naming the file and `flag`, the option
    /// that gave it.
    pub fn import_file(&mut self, path: &Path, flag: &str) -> Result<(), TrainError> {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        crate::named::read_safetensors(&bytes)
            .and_then(|tensors| self.import(&tensors))
            .map_err(|e| TrainError::Checkpoint(format!("{} ({flag}): {e}", path.display())))
    }
}

/// The contiguous share `[first, end)` of `batch` items that shard `shard` of `shards` takes.
pub fn shard_range(batch: usize, shard: usize, shards: usize) -> (usize, usize) {
    (shard * batch / shards, (shard + 1) * batch / shards)
}

/// The seed of shard `shard`'s own random stream drawn from `seed`; with one shard `seed`
/// itself, so an unsharded run draws what it drew before shards existed.
pub fn shard_seed(seed: u64, shard: usize, shards: usize) -> u64 {
    if shards == 1 {
        seed
    } else {
        crate::data::mix(seed, 1 + shard as u64)
    }
}

/// A shard's mean loss weighted by its share of the `batch` items, so the shards' losses add
/// up to the batch mean; with one shard `loss` unchanged (the graph stays as before shards).
pub fn batch_share(loss: Tensor<1>, batch: usize, shard: usize, shards: usize) -> Tensor<1> {
    if shards == 1 {
        return loss;
    }
    let (first, end) = shard_range(batch, shard, shards);
    loss * ((end - first) as f32 / batch as f32)
}

/// Serde default of a stage's `shards`: one (no threads), and left out of `stage.json` when
/// it is one, so directories trained before shards existed still match their settings.
pub(crate) fn one_shard() -> usize {
    1
}

pub(crate) fn is_one_shard(n: &usize) -> bool {
    *n == 1
}

/// The value of a one-element loss.
pub fn scalar(loss: &Tensor<1>) -> Result<f32, TrainError> {
    loss.clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| TrainError::Model(format!("loss readback: {e:?}")))?
        .first()
        .copied()
        .ok_or_else(|| TrainError::Model("empty loss".into()))
}

/// Writes via a temporary file and a rename, so a killed run never leaves half a checkpoint.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// One stage of the recipe, driven by [`run_stage`].
pub trait Stage {
    /// Directory name under the run's output (`vae`, `vlm`, `dit`).
    fn name(&self) -> &'static str;
    /// Optimizer steps in all.
    fn steps(&self) -> usize;
    /// One optimizer step `k` (0-based); returns the loss and the learning rate.
    fn step(&mut self, k: usize) -> Result<(f32, f64), TrainError>;
    /// Saves weights and optimizer state into `dir`; returns the parameter ids.
    fn save(&self, dir: &Path) -> Result<Vec<u64>, TrainError>;
    /// Restores them.
    fn load(&mut self, dir: &Path, ids: Vec<u64>) -> Result<(), TrainError>;
}

/// Where a stage stands, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Latest loss.
    pub loss: f32,
    /// Exponential moving average of the loss.
    pub smooth: f32,
    /// Seconds since this process started the stage.
    pub elapsed: f64,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    ids: Vec<u64>,
}

/// What [`run_stage`] did.
#[derive(Clone, Debug)]
pub struct StageRun {
    /// The whole curve (resumed steps included).
    pub curve: LossCurve,
    /// Whether the stage reached its last step (else a limit stopped it).
    pub finished: bool,
    /// Step the run resumed from (0 = fresh).
    pub resumed_from: usize,
    /// Seconds this process spent training.
    pub seconds: f64,
}

/// When a call of [`run_stage_until`] stops early (the next call resumes).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// Stop after this step.
    pub stop_step: usize,
    /// Stop after the first step that ends past this instant.
    pub deadline: Option<Instant>,
}

impl Limit {
    /// No limit: run the stage to its end.
    pub const NONE: Limit = Limit {
        stop_step: usize::MAX,
        deadline: None,
    };
}

/// Runs `stage` in `dir` (created): resumes from `dir/checkpoint` when there is one, saves a
/// checkpoint every `every` steps and at the end, keeps `loss.csv` / `loss.png` current.
pub fn run_stage(
    stage: &mut dyn Stage,
    dir: &Path,
    every: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<StageRun, TrainError> {
    run_stage_until(stage, dir, every, Limit::NONE, progress)
}

/// [`run_stage`] that stops early, with a checkpoint, at `limit` (a time-boxed run; the
/// next call resumes). [`StageRun::finished`] says whether the stage reached its last step.
pub fn run_stage_until(
    stage: &mut dyn Stage,
    dir: &Path,
    every: usize,
    limit: Limit,
    progress: &mut dyn FnMut(Progress),
) -> Result<StageRun, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let ckpt: PathBuf = dir.join("checkpoint");
    let state_path = ckpt.join("state.json");
    let mut curve = LossCurve::default();
    let mut start = 0;
    if state_path.exists() {
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
        stage.load(&ckpt, state.ids)?;
        start = state.step;
        let csv = dir.join("loss.csv");
        if csv.exists() {
            let text = std::fs::read_to_string(&csv).map_err(|e| TrainError::io(&csv, e))?;
            curve = LossCurve::from_csv(&text)?;
            curve.rows.retain(|r| r.0 <= start);
        }
    }
    let total = stage.steps();
    let end = total.min(limit.stop_step.max(start));
    let began = Instant::now();
    let mut smooth = curve.smoothed(0.05).last().copied();
    let mut done = start;
    for k in start..end {
        let (loss, lr) = stage.step(k)?;
        done = k + 1;
        curve.rows.push((k + 1, loss, lr));
        let s = smooth.map_or(loss, |s| s + 0.05 * (loss - s));
        smooth = Some(s);
        progress(Progress {
            step: k + 1,
            total,
            loss,
            smooth: s,
            elapsed: began.elapsed().as_secs_f64(),
        });
        let out_of_time = limit.deadline.is_some_and(|d| Instant::now() >= d);
        if (k + 1) % every.max(1) == 0 || k + 1 == end || out_of_time {
            std::fs::create_dir_all(&ckpt).map_err(|e| TrainError::io(&ckpt, e))?;
            let ids = stage.save(&ckpt)?;
            let state = serde_json::to_string(&CheckpointState { step: k + 1, ids })
                .map_err(|e| TrainError::Checkpoint(e.to_string()))?;
            write_atomic(&state_path, state.as_bytes())?;
            curve.save(dir)?;
        }
        if out_of_time {
            break;
        }
    }
    if start == end {
        curve.save(dir)?;
    }
    Ok(StageRun {
        curve,
        finished: done == total,
        resumed_from: start,
        seconds: began.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = OptimConfig {
            steps: 100,
            lr: 1e-3,
            warmup: 10,
            final_lr_fraction: 0.1,
            weight_decay: 0.0,
            clip_norm: 1.0,
        };
        assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!(c.lr_at(50) < 1e-3 && c.lr_at(50) > 1e-4);
        assert!((c.lr_at(99) - 1e-4).abs() < 2e-6);
    }

    #[test]
    fn the_average_starts_as_a_copy_then_moves_by_decay_to_the_power_every() {
        let t = |v: f32| vec![("w".to_string(), vec![2], vec![v, 2.0 * v])];
        let mut ema = Ema {
            decay: 0.5,
            every: 2,
            tensors: None,
        };
        ema.update(t(4.0));
        assert_eq!(ema.tensors, Some(t(4.0)));
        // d = 0.5² = 0.25: 0.25 · 4 + 0.75 · 8 = 7.
        ema.update(t(8.0));
        assert_eq!(ema.tensors, Some(t(7.0)));
    }
}
