//! The browser's [`ShardSource`]: shard bytes come from a JS callback (the worker's
//! `web/weights.js`, which takes them from IndexedDB or the network and verifies them), one
//! shard at a time, so wasm memory holds a single shard while the loader places it.

use std::fmt;

use js_sys::{Function, Promise, Uint8Array};
use unifusion_weights::loader::ShardSource;
use unifusion_weights::manifest::ShardEntry;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// Asks `fetch_shard(index)` for `Promise<Uint8Array>` of shard `index`.
pub struct JsShardSource {
    fetch_shard: Function,
}

impl JsShardSource {
    /// `fetch_shard` is `(index: number) => Promise<Uint8Array>`.
    pub fn new(fetch_shard: Function) -> Self {
        Self { fetch_shard }
    }
}

/// Why the JS side gave no bytes (its error's message, e.g. a network error or an abort).
#[derive(Debug)]
pub struct JsSourceError(pub String);

impl fmt::Display for JsSourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsSourceError {}

/// The message of a thrown JS value (an `Error`'s `message`, or its string form).
pub fn js_message(value: &JsValue) -> String {
    if let Some(error) = value.dyn_ref::<js_sys::Error>() {
        let name = String::from(error.name());
        let message = String::from(error.message());
        if name == "Error" || name.is_empty() {
            message
        } else {
            format!("{name}: {message}")
        }
    } else {
        value.as_string().unwrap_or_else(|| format!("{value:?}"))
    }
}

impl ShardSource for JsShardSource {
    type Error = JsSourceError;

    async fn shard(&mut self, index: usize, entry: &ShardEntry) -> Result<Vec<u8>, JsSourceError> {
        let promise = self
            .fetch_shard
            .call1(&JsValue::NULL, &JsValue::from(index as u32))
            .map_err(|e| JsSourceError(js_message(&e)))?;
        let value = JsFuture::from(Promise::resolve(&promise))
            .await
            .map_err(|e| JsSourceError(js_message(&e)))?;
        let bytes = value.dyn_into::<Uint8Array>().map_err(|_| {
            JsSourceError(format!(
                "the page gave no Uint8Array for {} (shard {index})",
                entry.file
            ))
        })?;
        // One copy into wasm memory; the JS side drops its copy once this resolves.
        Ok(bytes.to_vec())
    }
}
