//! `ModelConfig`: the student's shapes, read from a TOML file under `configs/`. Unknown keys and
//! configurations that cannot work are refused with a message naming the key.

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Activation of the transformer MLPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · σ(1.702 x)` (OpenAI CLIP / open_clip ViT-B/16).
    QuickGelu,
    /// Exact erf GELU (BERT).
    Gelu,
}

/// Where the LayerNorms of a transformer block sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// `x = LN(x + f(x))` (BERT).
    Post,
    /// `x = x + f(LN(x))` (CLIP), with a final LayerNorm.
    Pre,
}

/// Which token's final state represents the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token (`[CLS]`, BERT).
    Cls,
    /// The last valid token (end-of-text, CLIP's causal text tower).
    Eot,
}

fn default_channels() -> usize {
    3
}
fn default_vision_eps() -> f64 {
    1e-5
}
fn default_text_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}

/// The ViT image tower.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Square input size in pixels.
    pub image_size: usize,
    /// Square patch size (= conv kernel and stride).
    pub patch_size: usize,
    /// Input channels (3).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Transformer width.
    pub width: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio · width`.
    pub mlp_ratio: f64,
    /// MLP activation.
    pub act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_vision_eps")]
    pub ln_eps: f64,
}

/// The text tower.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// Token vocabulary size (≥ the tokenizer's).
    pub vocab_size: usize,
    /// Maximum sequence length (positional embedding rows).
    pub context_length: usize,
    /// Transformer width.
    pub width: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio · width`.
    pub mlp_ratio: f64,
    /// MLP activation.
    pub act: Activation,
    /// Post-LN (BERT) or pre-LN blocks.
    pub norm: NormPlacement,
    /// Causal self-attention (CLIP text tower) instead of bidirectional (BERT).
    pub causal: bool,
    /// Class-token or end-of-text pooling.
    pub pooling: Pooling,
    /// LayerNorm epsilon.
    #[serde(default = "default_text_eps")]
    pub ln_eps: f64,
    /// Rows of the token-type embedding (BERT: 2; type 0 is used).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
}

/// The whole student.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Joint embedding width (512 in the paper).
    pub embed_dim: usize,
    /// Initial logit scale `s` (used as `exp(s)`); ln(1/0.07) by default.
    #[serde(default = "default_logit_scale")]
    pub logit_scale_init: f64,
    /// Seed of the parameter initialisation.
    #[serde(default)]
    pub seed: u64,
    /// Image tower.
    pub vision: VisionConfig,
    /// Text tower.
    pub text: TextConfig,
}

fn bad(key: &str, msg: String) -> EngineError {
    EngineError::Config(format!("`{key}`: {msg}"))
}

impl ModelConfig {
    /// Parses and validates a TOML document; `origin` names it in errors.
    pub fn from_toml_str(s: &str, origin: &str) -> Result<Self> {
        let c: ModelConfig =
            toml::from_str(s).map_err(|e| EngineError::Config(format!("{origin}: {e}")))?;
        c.validate()
            .map_err(|e| EngineError::Config(format!("{origin}: {e}")))?;
        Ok(c)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&s, &path.display().to_string())
    }

    /// Checks that the shapes can work; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        for (key, val) in [
            ("embed_dim", self.embed_dim),
            ("vision.image_size", v.image_size),
            ("vision.patch_size", v.patch_size),
            ("vision.channels", v.channels),
            ("vision.width", v.width),
            ("vision.layers", v.layers),
            ("vision.heads", v.heads),
            ("text.vocab_size", t.vocab_size),
            ("text.context_length", t.context_length),
            ("text.width", t.width),
            ("text.layers", t.layers),
            ("text.heads", t.heads),
            ("text.type_vocab_size", t.type_vocab_size),
        ] {
            if val == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(bad(
                "vision.image_size",
                format!(
                    "{} is not divisible by patch_size {}",
                    v.image_size, v.patch_size
                ),
            ));
        }
        if !v.width.is_multiple_of(v.heads) {
            return Err(bad(
                "vision.heads",
                format!("width {} is not divisible by {} heads", v.width, v.heads),
            ));
        }
        if !t.width.is_multiple_of(t.heads) {
            return Err(bad(
                "text.heads",
                format!("width {} is not divisible by {} heads", t.width, t.heads),
            ));
        }
        for (key, ratio, width) in [
            ("vision.mlp_ratio", v.mlp_ratio, v.width),
            ("text.mlp_ratio", t.mlp_ratio, t.width),
        ] {
            let h = ratio * width as f64;
            if !(h >= 1.0 && h.fract() == 0.0) {
                return Err(bad(
                    key,
                    format!("{ratio} × width {width} is not a positive whole hidden width"),
                ));
            }
        }
        for (key, eps) in [("vision.ln_eps", v.ln_eps), ("text.ln_eps", t.ln_eps)] {
            if !(eps > 0.0 && eps.is_finite()) {
                return Err(bad(key, format!("{eps} must be a positive finite number")));
            }
        }
        if !self.logit_scale_init.is_finite() {
            return Err(bad("logit_scale_init", "must be finite".into()));
        }
        if t.vocab_size > u32::MAX as usize {
            return Err(bad(
                "text.vocab_size",
                "does not fit token ids of 32 bits".into(),
            ));
        }
        Ok(())
    }

    /// Refuses a vocabulary smaller than the tokenizer's.
    pub fn check_tokenizer_vocab(&self, tokenizer_vocab: usize) -> Result<()> {
        if self.text.vocab_size < tokenizer_vocab {
            return Err(bad(
                "text.vocab_size",
                format!(
                    "{} is smaller than the tokenizer's vocabulary of {tokenizer_vocab}",
                    self.text.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Number of patches per image.
    pub fn num_patches(&self) -> usize {
        let g = self.vision.image_size / self.vision.patch_size;
        g * g
    }
    /// Hidden width of the text projection MLP: `(text.width + embed_dim) / 2`.
    pub fn text_proj_hidden(&self) -> usize {
        (self.text.width + self.embed_dim) / 2
    }
}
