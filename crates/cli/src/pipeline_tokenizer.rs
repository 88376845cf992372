//! The tokenizer the generating commands use.
//!
//! With the `tokenizer` feature: the model crate's `VlmTokenizer` (the `tokenizers` crate,
//! any `tokenizer.json`). Without it (the default until the workspace turns `tokenizers` on
//! for every build; enabling it today changes dependency features shared with burn and forces
//! a burn rebuild): a byte-level BPE reader for `tokenizer.json` files *without merges*, which
//! covers the tiny model of `make-tiny-model`; a real checkpoint's tokenizer (with merges)
//! is refused with a message saying how to build.

use std::collections::HashMap;

use unifusion_model::pipeline::Tokenize;
use unifusion_model::vlm::VlmError;

/// A `tokenizer.json` tokenizer.
pub struct CliTokenizer {
    #[cfg(feature = "tokenizer")]
    inner: unifusion_model::vlm::processor::VlmTokenizer,
    #[cfg(not(feature = "tokenizer"))]
    inner: ByteLevel,
}

impl CliTokenizer {
    /// Parses `tokenizer.json` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VlmError> {
        #[cfg(feature = "tokenizer")]
        let inner = unifusion_model::vlm::processor::VlmTokenizer::from_bytes(bytes)?;
        #[cfg(not(feature = "tokenizer"))]
        let inner = ByteLevel::from_bytes(bytes)?;
        Ok(Self { inner })
    }

    /// Id of a token such as `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_id(token)
    }
}

impl Tokenize for CliTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError> {
        self.inner.encode(text)
    }
    fn decode(&self, ids: &[u32]) -> Result<String, VlmError> {
        self.inner.decode(ids)
    }
}

/// GPT-2's byte ↔ printable-character table (`bytes_to_unicode`).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    table
}

/// Byte-level BPE without merges: every byte is one token; added tokens are matched first.
pub struct ByteLevel {
    byte_ids: [u32; 256],
    id_bytes: HashMap<u32, u8>,
    added: Vec<(String, u32, bool)>,
}

impl ByteLevel {
    /// Parses a byte-level `tokenizer.json` with an empty merge list.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VlmError> {
        let bad = |m: &str| VlmError::Tokenizer(m.to_string());
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| VlmError::Tokenizer(e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(bad("only byte-level BPE tokenizers are read by this build"));
        }
        if model["merges"].as_array().is_some_and(|m| !m.is_empty()) {
            return Err(bad(
                "this tokenizer has BPE merges; build unifusion with `--features tokenizer` to use it",
            ));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("no model.vocab"))?;
        let chars = byte_chars();
        let mut byte_ids = [u32::MAX; 256];
        let mut id_bytes = HashMap::new();
        for (b, c) in chars.iter().enumerate() {
            let id = vocab
                .get(&c.to_string())
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad("the vocabulary lacks a byte token"))?
                as u32;
            byte_ids[b] = id;
            id_bytes.insert(id, b as u8);
        }
        let mut added: Vec<(String, u32, bool)> = json["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        Some((
                            t["content"].as_str()?.to_string(),
                            t["id"].as_u64()? as u32,
                            t["special"].as_bool().unwrap_or(false),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        added.sort_by_key(|(s, _, _)| std::cmp::Reverse(s.len())); // longest match first
        Ok(Self {
            byte_ids,
            id_bytes,
            added,
        })
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        self.added.iter().find(|(s, _, _)| s == token).map(|t| t.1)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError> {
        let mut ids = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (s, id, _) in &self.added {
                if let Some(r) = rest.strip_prefix(s.as_str()) {
                    ids.push(*id);
                    rest = r;
                    continue 'outer;
                }
            }
            let c = rest.chars().next().unwrap_or(' ');
            let mut buf = [0u8; 4];
            ids.extend(
                c.encode_utf8(&mut buf)
                    .bytes()
                    .map(|b| self.byte_ids[b as usize]),
            );
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String, VlmError> {
        let mut bytes = Vec::new();
        for id in ids {
            if let Some(b) = self.id_bytes.get(id) {
                bytes.push(*b);
            } else if let Some((s, _, false)) = self.added.iter().find(|t| t.1 == *id) {
                bytes.extend_from_slice(s.as_bytes());
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny tokenizer against the ids PyPI `tokenizers` gives (tests/fixtures/vlm).
    #[test]
    fn byte_level_matches_the_fixture_cases() {
        let t = ByteLevel::from_bytes(crate::tiny_model::TINY_TOKENIZER.as_bytes())
            .expect("test value");
        let cases: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/vlm/tokenizer_cases.json"
        ))
        .expect("test value");
        let cases = cases.as_array().expect("test value");
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().expect("test value");
            let want: Vec<u32> = case["ids"]
                .as_array()
                .expect("test value")
                .iter()
                .map(|v| v.as_u64().expect("test value") as u32)
                .collect();
            assert_eq!(t.encode(text).expect("test value"), want, "{text:?}");
        }
        assert_eq!(t.token_id("<|im_end|>"), Some(257));
        let ids = t
            .encode("<|im_start|>héllo<IMG_CONTEXT>")
            .expect("test value");
        assert_eq!(t.decode(&ids).expect("test value"), "héllo");
    }
}
