//! Flow-matching sampling: `x_t = (1 − t)·x₀ + t·ε`, the model predicts `v = ε − x₀`, t = 1 is
//! noise. The schedule is diffusers' `FlowMatchEulerDiscreteScheduler` with exponential time
//! shift, as the Krea 2 pipeline sets it: `s = linspace(1, 1/N, N)` (= `linspace(1, 0, N+1)`
//! without its last point), `σ = e^μ / (e^μ + (1/s − 1))` in f32, a final `σ = 0`; Euler steps
//! `x ← x + (σ_{i+1} − σ_i)·v`. μ is fixed or linear in the image token count.
//!
//! The loop ([`sample`]) takes any [`Scheduler`] and any [`Denoiser`] (a closure works), calls
//! back after every step (progress, previews) and stops when the callback says so.
//! [`Guided`] adds classifier-free guidance with a null condition. Noise is drawn on the host
//! by [`SeededNormal`] from IEEE-exact arithmetic only, so a seed gives the same latents on
//! every backend, native or browser.

use std::ops::ControlFlow;

use burn::tensor::{DType, Device, Tensor, TensorData};

use super::GeneratorError;
use super::dit::{Krea2Transformer, TextCondition, patchify, unpatchify};
use super::rope::{RopeTable, position_ids};

/// How μ (the log-SNR shift) is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shift {
    /// A fixed μ (Krea 2 turbo: 1.15).
    Fixed(f64),
    /// μ linear in the image token count between `(base_seq_len, base_shift)` and
    /// `(max_seq_len, max_shift)` (diffusers' `calculate_shift`).
    Resolution {
        /// Token count at which μ = `base_shift`.
        base_seq_len: usize,
        /// Token count at which μ = `max_shift`.
        max_seq_len: usize,
        /// μ at `base_seq_len`.
        base_shift: f64,
        /// μ at `max_seq_len`.
        max_shift: f64,
    },
}

impl Shift {
    /// Krea 2's base-model shift: (256 tokens, 0.5) to (6400 tokens, 1.15).
    pub const KREA2: Shift = Shift::Resolution {
        base_seq_len: 256,
        max_seq_len: 6400,
        base_shift: 0.5,
        max_shift: 1.15,
    };

    /// μ for `image_seq_len` image tokens.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        match *self {
            Shift::Fixed(mu) => mu,
            Shift::Resolution {
                base_seq_len,
                max_seq_len,
                base_shift,
                max_shift,
            } => {
                let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
                let b = base_shift - m * base_seq_len as f64;
                image_seq_len as f64 * m + b
            }
        }
    }
}

/// A step rule over a fixed list of noise levels.
pub trait Scheduler {
    /// Noise levels σ₀ = (about) 1 > … > σ_N = 0; N + 1 entries.
    fn sigmas(&self) -> &[f32];

    /// The timestep the model sees at step `i` (in [0, 1]).
    fn timestep(&self, i: usize) -> f32 {
        self.sigmas()[i]
    }

    /// One step from σ_i to σ_{i+1} given the velocity `v` at `x`.
    fn step<const D: usize>(&self, i: usize, x: Tensor<D>, v: Tensor<D>) -> Tensor<D> {
        let s = self.sigmas();
        x + v * (s[i + 1] - s[i])
    }

    /// Number of steps.
    fn steps(&self) -> usize {
        self.sigmas().len().saturating_sub(1)
    }
}

/// Euler on the shifted schedule (`FlowMatchEulerDiscreteScheduler`, dynamic shifting).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchEuler {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
}

impl FlowMatchEuler {
    /// `steps` Euler steps with shift μ = `mu`.
    pub fn new(steps: usize, mu: f64) -> Self {
        let n = steps.max(1);
        // np.linspace(1.0, 1/n, n) in f64, then cast to f32.
        let stop = 1.0 / n as f64;
        let step = if n > 1 {
            (stop - 1.0) / (n - 1) as f64
        } else {
            0.0
        };
        let e = mu.exp() as f32;
        let mut sigmas: Vec<f32> = (0..n)
            .map(|i| {
                let s = if i + 1 == n {
                    stop
                } else {
                    i as f64 * step + 1.0
                } as f32;
                e / (e + (1.0 / s - 1.0))
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * 1000.0).collect();
        sigmas.push(0.0);
        Self { sigmas, timesteps }
    }

    /// `steps` steps with μ from `shift` for `image_seq_len` image tokens.
    pub fn with_shift(steps: usize, shift: Shift, image_seq_len: usize) -> Self {
        Self::new(steps, shift.mu(image_seq_len))
    }

    /// diffusers' `scheduler.timesteps` (σ·1000), N entries.
    pub fn timesteps_1000(&self) -> &[f32] {
        &self.timesteps
    }
}

impl Scheduler for FlowMatchEuler {
    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `timesteps[i] / 1000`, exactly what the Krea 2 pipeline passes to the transformer.
    fn timestep(&self, i: usize) -> f32 {
        self.timesteps[i] / 1000.0
    }
}

/// Predicts the flow velocity at `x` and time `t`.
pub trait Denoiser<const D: usize> {
    /// `v(x, t)`, same shape as `x`.
    fn velocity(&self, x: Tensor<D>, t: f32) -> Result<Tensor<D>, GeneratorError>;
}

impl<const D: usize, F> Denoiser<D> for F
where
    F: Fn(Tensor<D>, f32) -> Result<Tensor<D>, GeneratorError>,
{
    fn velocity(&self, x: Tensor<D>, t: f32) -> Result<Tensor<D>, GeneratorError> {
        self(x, t)
    }
}

/// Where the sampler is after a step, for progress bars and previews.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// Steps done (1-based after the first step).
    pub done: usize,
    /// Steps in all.
    pub total: usize,
    /// The noise level reached.
    pub sigma: f32,
}

/// Why sampling stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The callback asked to stop.
    #[error("cancelled after {done} of {total} steps")]
    Cancelled {
        /// Steps done.
        done: usize,
        /// Steps planned.
        total: usize,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] GeneratorError),
}

/// Runs the scheduler from `noise` to `σ = 0`. `on_step` sees each new `x`; returning
/// `ControlFlow::Break(())` cancels (the result is then [`SampleError::Cancelled`]).
pub fn sample<const D: usize, S: Scheduler>(
    scheduler: &S,
    denoiser: &impl Denoiser<D>,
    noise: Tensor<D>,
    mut on_step: impl FnMut(StepInfo, &Tensor<D>) -> ControlFlow<()>,
) -> Result<Tensor<D>, SampleError> {
    let total = scheduler.steps();
    let mut x = noise;
    for i in 0..total {
        let v = denoiser.velocity(x.clone(), scheduler.timestep(i))?;
        x = scheduler.step(i, x, v);
        let info = StepInfo {
            done: i + 1,
            total,
            sigma: scheduler.sigmas()[i + 1],
        };
        if on_step(info, &x).is_break() {
            return Err(SampleError::Cancelled { done: i + 1, total });
        }
    }
    Ok(x)
}

/// The DiT as a [`Denoiser`] over packed latents `[B, N, C·4]`, with classifier-free guidance
/// `v = v_null + w·(v_cond − v_null)` when a null condition is given (`w = 1` or no null
/// condition: one forward per step). Krea 2's pipeline writes `v_c + g·(v_c − v_u)`, i.e.
/// `w = g + 1`.
pub struct Guided<'a> {
    /// The transformer.
    pub model: &'a Krea2Transformer,
    /// The prompt's text condition.
    pub cond: &'a TextCondition,
    /// The null condition (e.g. the empty prompt) for CFG.
    pub null: Option<&'a TextCondition>,
    /// Guidance weight `w`.
    pub guidance: f32,
    /// RoPE for `[text; image]` (the null condition must have the same text length).
    pub rope: &'a RopeTable,
}

impl Denoiser<3> for Guided<'_> {
    fn velocity(&self, x: Tensor<3>, t: f32) -> Result<Tensor<3>, GeneratorError> {
        let [batch, _, _] = x.dims();
        let device = x.device();
        // f32 whatever the precision (the timestep embedding's sinusoids need it).
        let timestep = Tensor::<1>::from_data(
            TensorData::new(vec![t; batch], [batch]),
            (&device, DType::F32),
        );
        let v = self
            .model
            .forward_with_text(x.clone(), self.cond, timestep.clone(), self.rope)?;
        match self.null {
            Some(null) if self.guidance != 1.0 => {
                let v_null = self.model.forward_with_text(x, null, timestep, self.rope)?;
                Ok(v_null.clone() + (v - v_null) * self.guidance)
            }
            _ => Ok(v),
        }
    }
}

/// What [`generate_latents`] needs besides the model and the text conditions.
#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    /// Euler steps.
    pub steps: usize,
    /// μ rule (fixed or by image token count).
    pub shift: Shift,
    /// CFG weight `w` (1 = no guidance).
    pub guidance: f32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// VAE latent height (a multiple of the patch size `p`; the DiT sees
    /// `height/p × width/p` tokens).
    pub height: usize,
    /// VAE latent width (a multiple of `p`).
    pub width: usize,
}

/// Text-to-latents: seeded noise `[B, C, h, w]` (C = `in_channels / p²`) → `p × p` patchify →
/// [`sample`] with [`Guided`] on the [`FlowMatchEuler`] schedule → unpatchify. Returns the
/// pipeline latents, ready for the VAE's `unscale_latents` and `decode`. `null` must have the
/// same text length as `cond` (pad it with the mask).
pub fn generate_latents(
    model: &Krea2Transformer,
    cond: &TextCondition,
    null: Option<&TextCondition>,
    options: &GenerateOptions,
    on_step: impl FnMut(StepInfo, &Tensor<3>) -> ControlFlow<()>,
) -> Result<Tensor<4>, SampleError> {
    let [batch, text_len, _] = cond.tokens.dims();
    let device = cond.tokens.device();
    let p = model.patch_size;
    let (gh, gw) = (options.height / p, options.width / p);
    let channels = model.in_channels / (p * p);
    let noise = seeded_noise::<4>(
        options.seed,
        [batch, channels, options.height, options.width],
        &device,
    );
    let x = patchify(noise, p)?;
    let rope = RopeTable::new(
        &position_ids(text_len, gh, gw),
        model.rope_axes,
        model.rope_theta,
        &device,
    );
    let denoiser = Guided {
        model,
        cond,
        null,
        guidance: options.guidance,
        rope: &rope,
    };
    let scheduler = FlowMatchEuler::with_shift(options.steps, options.shift, gh * gw);
    let x = sample(&scheduler, &denoiser, x, on_step)?;
    Ok(unpatchify(x, gh, gw, p)?)
}

/// Standard normal numbers from a seed, identical on every platform: SplitMix64 uniforms and
/// Marsaglia's polar method, with a logarithm built from IEEE-exact operations (no libm), so
/// native and wasm builds produce the same bits.
#[derive(Clone, Debug)]
pub struct SeededNormal {
    state: u64,
    spare: Option<f64>,
}

impl SeededNormal {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [−1, 1).
    fn next_signed(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }

    /// The next N(0, 1) sample, in f64.
    pub fn next_f64(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        loop {
            let (u, v) = (self.next_signed(), self.next_signed());
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * exact_ln(s) / s).sqrt();
                self.spare = Some(v * f);
                return u * f;
            }
        }
    }

    /// The next N(0, 1) sample, in f32.
    pub fn next_f32(&mut self) -> f32 {
        self.next_f64() as f32
    }
}

/// `ln(x)` for finite `x > 0` from +, −, ×, ÷ only (deterministic across platforms):
/// `x = m·2^e` with `m ∈ [√½, √2)`, `ln m = 2·atanh((m−1)/(m+1))` by its series.
fn exact_ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if x < f64::MIN_POSITIVE {
        // Subnormal: scale up first.
        return exact_ln(x * (1u64 << 54) as f64) - 54.0 * LN_2;
    }
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let (mut term, mut sum) = (s, 0.0);
    let mut k = 1.0;
    while k < 60.0 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    2.0 * sum + e as f64 * LN_2
}

/// Seeded `N(0, 1)` noise of `shape` on `device` (row-major order of draws), in f32 whatever
/// the device's precision: the sampler's latent state stays f32 (`crate::precision`).
pub fn seeded_noise<const D: usize>(seed: u64, shape: [usize; D], device: &Device) -> Tensor<D> {
    let mut rng = SeededNormal::new(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
    Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_ln_matches_std() {
        for x in [
            1e-300, 1e-12, 0.001, 0.3, 0.5, 0.7, 0.999_999, 1.0, 2.0, 123.456,
        ] {
            let (a, b) = (exact_ln(x), x.ln());
            assert!(
                (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(1.0),
                "{x}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn seeded_normal_is_standard_and_reproducible() {
        let mut a = SeededNormal::new(7);
        let xs: Vec<f64> = (0..20_000).map(|_| a.next_f64()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
        let mut b = SeededNormal::new(7);
        assert!(xs.iter().take(100).all(|x| *x == b.next_f64()));
        let mut c = SeededNormal::new(8);
        assert_ne!(xs[0], c.next_f64());
    }

    #[test]
    fn schedule_ends_at_zero_and_decreases() {
        let s = FlowMatchEuler::with_shift(8, Shift::KREA2, 1024);
        assert_eq!(s.sigmas().len(), 9);
        assert_eq!(s.sigmas()[0], 1.0);
        assert_eq!(s.sigmas()[8], 0.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn cancellation_stops_the_loop() {
        let device = Device::flex();
        let s = FlowMatchEuler::new(4, 0.5);
        let x = Tensor::<2>::zeros([1, 2], &device);
        let denoiser = |x: Tensor<2>, _t: f32| -> Result<Tensor<2>, GeneratorError> { Ok(x) };
        let err = sample(&s, &denoiser, x, |info, _| {
            if info.done == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(matches!(
            err,
            Err(SampleError::Cancelled { done: 2, total: 4 })
        ));
    }
}
