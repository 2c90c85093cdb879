//! Analytic model-FLOP count of the student, for throughput and model-FLOPs-utilisation figures.
//!
//! Only matrix products are counted (2 FLOPs per multiply-add): the patch embedding, the QKV,
//! output and MLP projections of every block, the two attention products `Q Kᵀ` and `P V`, and
//! the final projections. Element-wise work (LayerNorm, activations, softmax, embeddings) is left
//! out, as is the loss's `N × N` similarity products (about `4·N·D` per sample, under 0.1 % of a
//! ViT-B/16 sample at `N = 256`). A training step counts `3 ×` the forward (backward = two
//! products per forward product), the usual convention for model-FLOPs utilisation.
//!
//! Text counts only *valid* tokens: a caption of `n` tokens costs the same whatever the batch is
//! padded to, so padding never inflates the figure. Attention counts the (query, key) pairs that
//! are actually attended: `n²` bidirectional, `n(n+1)/2` causal.
//!
//! Per block of width `W`, MLP width `Hm`, `L` tokens and `A` attended pairs:
//! `8·L·W² (QKV + out) + 4·L·W·Hm (MLP) + 4·A·W (scores + weighted sum)`.

use crate::config::ModelConfig;

/// Forward FLOPs of one transformer block on `tokens` tokens with `pairs` attended
/// (query, key) pairs.
fn block_flops(width: f64, hidden: f64, tokens: f64, pairs: f64) -> f64 {
    8.0 * tokens * width * width + 4.0 * tokens * width * hidden + 4.0 * pairs * width
}

/// Forward FLOPs of the image tower for one image: patch embedding, the blocks over the
/// `1 + patches` tokens, and the class token's projection to the joint width.
pub fn image_forward_flops(cfg: &ModelConfig) -> f64 {
    let v = &cfg.vision;
    let w = v.width as f64;
    let hidden = v.mlp_ratio * w;
    let patches = cfg.num_patches() as f64;
    let tokens = patches + 1.0;
    let patch_k = (v.channels * v.patch_size * v.patch_size) as f64;
    let patch_embed = 2.0 * patches * patch_k * w;
    let blocks = v.layers as f64 * block_flops(w, hidden, tokens, tokens * tokens);
    let proj = 2.0 * w * cfg.embed_dim as f64;
    patch_embed + blocks + proj
}

/// Forward FLOPs of the text tower for one caption of `tokens` valid tokens (fractional values
/// are accepted, e.g. for interpolation): the blocks and the 2-layer projection of the pooled
/// token.
pub fn text_forward_flops(cfg: &ModelConfig, tokens: f64) -> f64 {
    let t = &cfg.text;
    let w = t.width as f64;
    let hidden = t.mlp_ratio * w;
    let pairs = if t.causal {
        tokens * (tokens + 1.0) / 2.0
    } else {
        tokens * tokens
    };
    let blocks = t.layers as f64 * block_flops(w, hidden, tokens, pairs);
    let ph = cfg.text_proj_hidden() as f64;
    let proj = 2.0 * w * ph + 2.0 * ph * cfg.embed_dim as f64;
    blocks + proj
}

/// Training FLOPs (forward + backward = 3 × forward) of one sample: one image and one caption
/// of `text_tokens` valid tokens.
pub fn flops_per_sample(cfg: &ModelConfig, text_tokens: f64) -> f64 {
    3.0 * (image_forward_flops(cfg) + text_forward_flops(cfg, text_tokens))
}

/// Training FLOPs of a whole batch whose captions have `lengths` valid tokens each (the sum of
/// [`flops_per_sample`] over the rows; attention is quadratic in each row's own length, so the
/// mean length would undercount).
pub fn batch_flops(cfg: &ModelConfig, lengths: &[usize]) -> f64 {
    lengths
        .iter()
        .map(|&n| flops_per_sample(cfg, n as f64))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(name: &str) -> ModelConfig {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        ModelConfig::from_file(&p).unwrap()
    }

    /// configs/tiny.toml counted by hand: 32 px, patch 8 (16 patches, 17 tokens), width 64,
    /// 2 layers, MLP 256, joint 32; text width 64, 2 layers, MLP 256, projection 64→48→32.
    #[test]
    fn tiny_config_matches_hand_count() {
        let cfg = config("tiny.toml");
        // Image: patch embedding 16 patches × (3·8·8 = 192) inputs × 64 outputs.
        let patch = 2 * 16 * 192 * 64; // 393_216
                                       // One block on 17 tokens: QKV 17·64·192, out 17·64·64, fc 17·64·256, proj 17·256·64,
                                       // scores and weighted sum 1 head × 17 × 17 × 64 each.
        let vblock = 2 * (17 * 64 * 192 + 17 * 64 * 64 + 17 * 64 * 256 + 17 * 256 * 64)
            + 2 * 2 * (17 * 17 * 64);
        assert_eq!(vblock, 1_745_152);
        let image = patch + 2 * vblock + 2 * 64 * 32;
        assert_eq!(image_forward_flops(&cfg), image as f64);
        assert_eq!(image, 3_887_616);

        // Text with 10 valid tokens (bidirectional: 100 pairs).
        let tblock = 2 * (10 * 64 * 192 + 10 * 64 * 64 + 10 * 64 * 256 + 10 * 256 * 64)
            + 2 * 2 * (10 * 10 * 64);
        let text = 2 * tblock + 2 * 64 * 48 + 2 * 48 * 32;
        assert_eq!(text, 2_026_496);
        assert_eq!(text_forward_flops(&cfg, 10.0), text as f64);
        assert_eq!(flops_per_sample(&cfg, 10.0), 3.0 * (image + text) as f64);
    }

    #[test]
    fn causal_text_counts_only_attended_pairs() {
        let mut cfg = config("tiny.toml");
        let full = text_forward_flops(&cfg, 10.0);
        cfg.text.causal = true;
        let causal = text_forward_flops(&cfg, 10.0);
        // 100 − 55 = 45 pairs fewer, 4·W FLOPs each, in each of 2 layers.
        assert_eq!(full - causal, (2 * 45 * 4 * 64) as f64);
    }

    #[test]
    fn batch_sums_rows_and_ignores_padding() {
        let cfg = config("tiny.toml");
        let lengths = [3usize, 17, 32];
        let want: f64 = lengths
            .iter()
            .map(|&n| flops_per_sample(&cfg, n as f64))
            .sum();
        assert_eq!(batch_flops(&cfg, &lengths), want);
        // Quadratic attention: the mean length undercounts a mixed batch.
        let mean = lengths.iter().sum::<usize>() as f64 / 3.0;
        assert!(batch_flops(&cfg, &lengths) > 3.0 * flops_per_sample(&cfg, mean));
    }

    /// The published ViT-B/16 figure: about 17.6 G multiply-adds per 224-px image (≈ 35.1 GFLOP).
    #[test]
    fn vit_b16_image_tower_matches_published_size() {
        let cfg = config("vit-b16-biomedbert.toml");
        let g = image_forward_flops(&cfg) / 1e9;
        assert!((g - 35.13).abs() < 0.05, "{g} GFLOP");
    }
}
