//! The UniFusion model on burn: pure tensor code, no I/O, compiles for wasm32.
//!
//! - [`vlm`]: the frozen InternVL3-layout encoder (InternViT, pixel shuffle, `mlp1`, Qwen2 LLM)
//!   with hidden-state taps and KV-cache greedy generation for VERIFI.
//! - [`generator`]: Layerwise Attention Pooling + refiner (text fusion), the single-stream DiT,
//!   the flow-matching sampler and the VAE decoders.
//! - [`pipeline`]: UniFusion end to end: VERIFI rewrite + taps → LAP → DiT sampling → VAE,
//!   for text-to-image, editing, multi-reference, variation and zero-shot editing.
//!
//! - [`linear`]: Linear layers with a float or an int8/int4 weight ([`linear::LinearW`]).
//! - [`precision`]: f32 or f16 compute, set on the device before loading.
//! - [`load`]: a whole model from a packed manifest through the weights crate's streaming
//!   loader (shard bytes from any source; nothing here reads files).

pub mod attention;
pub mod generator;
pub mod linear;
pub mod load;
pub mod pipeline;
pub mod precision;
pub mod vlm;
