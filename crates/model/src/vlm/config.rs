//! Configs of the InternVL3-layout VLM: a serde mirror of transformers' `InternVLConfig`
//! (`config.json` of `InternVLForConditionalGeneration`, with `InternVLVisionConfig` and
//! `Qwen2Config` inside) and of the original OpenGVLab `InternVLChatConfig`
//! (`vision_config` / `llm_config`), both turned into one [`InternVlConfig`].
//!
//! Mirrors transformers v5.24 `models/internvl/configuration_internvl.py` and
//! `models/qwen2/configuration_qwen2.py`.

use serde::{Deserialize, Serialize};

use super::VlmError;

/// The InternViT vision tower (transformers `InternVLVisionConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Width of the tower (1024 for InternViT-300M).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads (head dim = hidden / heads).
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Bias on q/k/v projections (`qkv_bias` in the original config).
    #[serde(default)]
    pub attention_bias: bool,
    /// RMSNorm over the full q and k projections before the head split.
    #[serde(default)]
    pub use_qk_norm: bool,
    /// `"layer_norm"` or `"rms_norm"`.
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    /// Epsilon of the block norms.
    #[serde(default = "default_vision_eps")]
    pub layer_norm_eps: f64,
    /// Tile side the position embedding was trained for, `[h, w]` or a single number.
    #[serde(default = "default_image_size", deserialize_with = "pair")]
    pub image_size: [usize; 2],
    /// Patch side, `[h, w]` or a single number.
    #[serde(default = "default_patch_size", deserialize_with = "pair")]
    pub patch_size: [usize; 2],
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// `true`: no final norm after the encoder (InternVL3); `false`: a final LayerNorm.
    #[serde(default = "default_true")]
    pub use_mean_pooling: bool,
    /// Activation of the MLP (only exact GELU is supported).
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
}

/// RoPE parameters (transformers v5 `rope_parameters`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// Base θ.
    pub rope_theta: f64,
    /// Only `"default"` is supported.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

/// The Qwen2 language model (transformers `Qwen2Config`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); `None` = as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE (transformers v5).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE θ (transformers v4 and the original checkpoints).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Tied `lm_head` (as the text config says; the outer config may override).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation of the MLP (only SiLU is supported).
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// Sliding window attention is not supported; must be false.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// End-of-sequence token(s), if the config names them.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// transformers `InternVLConfig` (`model_type: "internvl"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InternVlConfig {
    /// The InternViT tower.
    pub vision_config: VisionConfig,
    /// The Qwen2 LLM.
    pub text_config: TextConfig,
    /// `<IMG_CONTEXT>` token id.
    #[serde(default = "default_image_token")]
    pub image_token_id: u32,
    /// Image tokens per tile (256 for 448-px tiles).
    #[serde(default = "default_image_seq")]
    pub image_seq_length: usize,
    /// Pixel-shuffle ratio (0.5: 2×2 patches → one token).
    #[serde(default = "default_downsample")]
    pub downsample_ratio: f64,
    /// Projector activation (only exact GELU is supported).
    #[serde(default = "default_gelu")]
    pub projector_hidden_act: String,
    /// Which vision layer feeds the projector (-1 = last).
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    /// `"default"` drops CLS, `"full"` keeps it (only `"default"` is supported).
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    /// Tied `lm_head`.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// RoPE θ from either spelling (default 10000, as transformers).
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
}

impl VisionConfig {
    /// Patch grid of the trained position embedding, `[rows, cols]`.
    pub fn grid(&self) -> [usize; 2] {
        [
            self.image_size[0] / self.patch_size[0],
            self.image_size[1] / self.patch_size[1],
        ]
    }
}

impl InternVlConfig {
    /// Parse a `config.json` in either layout (transformers or original OpenGVLab chat).
    pub fn from_json(text: &str) -> Result<Self, VlmError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| VlmError::Config(e.to_string()))?;
        let config = if value.get("llm_config").is_some() {
            let original: OriginalChatConfig =
                serde_json::from_value(value).map_err(|e| VlmError::Config(e.to_string()))?;
            original.into_config()
        } else {
            serde_json::from_value(value).map_err(|e| VlmError::Config(e.to_string()))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Image tokens one tile yields after pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        let [gh, gw] = self.vision_config.grid();
        let r = self.shuffle_factor();
        (gh / r) * (gw / r)
    }

    /// `1 / downsample_ratio` as an integer (2 for 0.5).
    pub fn shuffle_factor(&self) -> usize {
        (1.0 / self.downsample_ratio).round() as usize
    }

    /// Reject what this implementation does not do, with the field to fix.
    pub fn validate(&self) -> Result<(), VlmError> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let bad = |m: String| Err(VlmError::Config(m));
        // Zero sizes would divide by zero below and in the model: refuse them first.
        if v.hidden_size == 0 || v.num_attention_heads == 0 {
            return bad(
                "vision_config hidden_size and num_attention_heads must be positive".into(),
            );
        }
        if t.hidden_size == 0 || t.num_attention_heads == 0 || t.kv_heads() == 0 {
            return bad("text_config hidden_size and head counts must be positive".into());
        }
        if !(self.downsample_ratio > 0.0 && self.downsample_ratio <= 1.0) {
            return bad(format!(
                "downsample_ratio must be in (0, 1], got {}",
                self.downsample_ratio
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return bad("vision_config.hidden_size must divide by num_attention_heads".into());
        }
        if !t.hidden_size.is_multiple_of(t.num_attention_heads)
            || !t.num_attention_heads.is_multiple_of(t.kv_heads())
        {
            return bad("text_config heads must divide hidden_size and num_key_value_heads must divide num_attention_heads".into());
        }
        if !t.head_dim().is_multiple_of(2) {
            return bad("text_config head_dim must be even for RoPE".into());
        }
        if !matches!(v.norm_type.as_str(), "layer_norm" | "rms_norm") {
            return bad(format!(
                "vision_config.norm_type {:?} is not supported",
                v.norm_type
            ));
        }
        if v.hidden_act != "gelu" || self.projector_hidden_act != "gelu" {
            return bad(
                "only exact GELU (\"gelu\") is supported in the vision tower and projector".into(),
            );
        }
        if t.hidden_act != "silu" {
            return bad(format!(
                "text_config.hidden_act {:?} is not supported",
                t.hidden_act
            ));
        }
        if t.use_sliding_window {
            return bad("text_config.use_sliding_window is not supported".into());
        }
        if let Some(r) = &t.rope_parameters
            && r.rope_type != "default"
        {
            return bad(format!("rope_type {:?} is not supported", r.rope_type));
        }
        if self.vision_feature_select_strategy != "default" {
            return bad("vision_feature_select_strategy must be \"default\"".into());
        }
        let r = self.shuffle_factor();
        if r == 0 || (r as f64 * self.downsample_ratio - 1.0).abs() > 1e-9 {
            return bad("downsample_ratio must be 1/n".into());
        }
        let [gh, gw] = v.grid();
        if !gh.is_multiple_of(r) || !gw.is_multiple_of(r) {
            return bad("the patch grid must divide by 1/downsample_ratio".into());
        }
        Ok(())
    }

    /// InternVL3-1B: InternViT-300M-448px-V2.5 + Qwen2.5-0.5B (vocab 151674, untied).
    pub fn b1() -> Self {
        Self::real(qwen(896, 4864, 24, 14, 2, false))
    }
    /// InternVL3-2B: InternViT-300M-448px-V2.5 + Qwen2.5-1.5B.
    pub fn b2() -> Self {
        Self::real(qwen(1536, 8960, 28, 12, 2, false))
    }
    /// InternVL3-8B: InternViT-300M-448px-V2.5 + Qwen2.5-7B.
    pub fn b8() -> Self {
        Self::real(qwen(3584, 18944, 28, 28, 4, false))
    }
    /// A tiny random-weight model for tests and the browser self-test (56-px tiles, 4 tokens).
    pub fn tiny() -> Self {
        Self {
            vision_config: VisionConfig {
                hidden_size: 32,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 64,
                attention_bias: true,
                image_size: [56, 56],
                ..internvit_300m()
            },
            text_config: TextConfig {
                vocab_size: 272,
                ..qwen(48, 80, 3, 4, 2, false)
            },
            image_token_id: 260,
            image_seq_length: 4,
            tie_word_embeddings: false,
            ..Self::real(qwen(48, 80, 3, 4, 2, false))
        }
    }

    fn real(text_config: TextConfig) -> Self {
        Self {
            vision_config: internvit_300m(),
            text_config,
            image_token_id: 151_667,
            image_seq_length: 256,
            downsample_ratio: 0.5,
            projector_hidden_act: "gelu".into(),
            vision_feature_layer: -1,
            vision_feature_select_strategy: "default".into(),
            tie_word_embeddings: false,
        }
    }
}

fn internvit_300m() -> VisionConfig {
    VisionConfig {
        hidden_size: 1024,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        intermediate_size: 4096,
        attention_bias: true,
        use_qk_norm: false,
        norm_type: "layer_norm".into(),
        layer_norm_eps: 1e-6,
        image_size: [448, 448],
        patch_size: [14, 14],
        num_channels: 3,
        use_mean_pooling: true,
        hidden_act: "gelu".into(),
    }
}

fn qwen(
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    tie: bool,
) -> TextConfig {
    TextConfig {
        vocab_size: 151_674,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        rms_norm_eps: 1e-6,
        rope_parameters: Some(RopeParameters {
            rope_theta: 1_000_000.0,
            rope_type: "default".into(),
        }),
        rope_theta: None,
        tie_word_embeddings: tie,
        hidden_act: "silu".into(),
        use_sliding_window: false,
        eos_token_id: None,
    }
}

/// Original OpenGVLab `InternVLChatConfig` (`configuration_internvl_chat.py`).
#[derive(Deserialize)]
struct OriginalChatConfig {
    vision_config: OriginalVisionConfig,
    llm_config: TextConfig,
    #[serde(default = "default_downsample")]
    downsample_ratio: f64,
    #[serde(default = "default_select_layer")]
    select_layer: i64,
    #[serde(default)]
    force_image_size: Option<usize>,
    #[serde(default)]
    ps_version: Option<String>,
}

/// Original `InternVisionConfig` (`configuration_intern_vit.py`).
#[derive(Deserialize)]
struct OriginalVisionConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default)]
    qkv_bias: bool,
    #[serde(default)]
    qk_normalization: bool,
    #[serde(default = "default_norm_type_original")]
    norm_type: String,
    #[serde(default = "default_vision_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_image_size_scalar")]
    image_size: usize,
    #[serde(default = "default_patch_scalar")]
    patch_size: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    #[serde(default = "default_gelu")]
    hidden_act: String,
}

impl OriginalChatConfig {
    fn into_config(self) -> InternVlConfig {
        let v = self.vision_config;
        let size = self.force_image_size.unwrap_or(v.image_size);
        let norm_type = match v.norm_type.as_str() {
            "rms_norm" => "rms_norm".to_string(),
            "layer_norm" => "layer_norm".to_string(),
            other => other.to_string(),
        };
        let _ = self.ps_version; // v2 is the only pixel shuffle InternVL2.5+/3 ship
        let vision_config = VisionConfig {
            hidden_size: v.hidden_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            intermediate_size: v.intermediate_size,
            attention_bias: v.qkv_bias,
            use_qk_norm: v.qk_normalization,
            norm_type,
            layer_norm_eps: v.layer_norm_eps,
            image_size: [size, size],
            patch_size: [v.patch_size, v.patch_size],
            num_channels: v.num_channels,
            use_mean_pooling: true,
            hidden_act: v.hidden_act,
        };
        let r = (1.0 / self.downsample_ratio).round() as usize;
        let grid = size / v.patch_size.max(1);
        let tie = self.llm_config.tie_word_embeddings;
        InternVlConfig {
            vision_config,
            text_config: self.llm_config,
            image_token_id: 151_667,
            image_seq_length: (grid / r.max(1)).pow(2),
            downsample_ratio: self.downsample_ratio,
            projector_hidden_act: "gelu".into(),
            vision_feature_layer: self.select_layer,
            vision_feature_select_strategy: "default".into(),
            tie_word_embeddings: tie,
        }
    }
}

fn pair<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[usize; 2], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrTwo {
        One(usize),
        Two([usize; 2]),
    }
    Ok(match OneOrTwo::deserialize(d)? {
        OneOrTwo::One(n) => [n, n],
        OneOrTwo::Two(p) => p,
    })
}

fn default_norm_type() -> String {
    "layer_norm".into()
}
fn default_norm_type_original() -> String {
    "rms_norm".into()
}
fn default_vision_eps() -> f64 {
    1e-6
}
fn default_image_size() -> [usize; 2] {
    [448, 448]
}
fn default_patch_size() -> [usize; 2] {
    [14, 14]
}
fn default_image_size_scalar() -> usize {
    448
}
fn default_patch_scalar() -> usize {
    14
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_rope_type() -> String {
    "default".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_image_token() -> u32 {
    151_667
}
fn default_image_seq() -> usize {
    256
}
fn default_downsample() -> f64 {
    0.5
}
fn default_feature_layer() -> i64 {
    -1
}
fn default_select_layer() -> i64 {
    -1
}
fn default_strategy() -> String {
    "default".into()
}
