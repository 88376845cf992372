//! The generator: text fusion (LAP + refiner), single-stream DiT, sampler, VAE.
