//! Tokenizer: load a Hugging Face `tokenizer.json`, or train an uncased WordPiece vocabulary
//! (BERT normaliser and pre-tokeniser, `[CLS] … [SEP]` framing) from captions.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens of a trained vocabulary, in id order 0..=4.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains an uncased WordPiece tokenizer of at most `vocab_size` entries on `texts`.
pub fn train_wordpiece<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let wp = WordPiece::builder()
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("building WordPiece: {e}"))?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    let trainer = WordPieceTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .build();
    let mut trainer = TrainerWrapper::WordPieceTrainer(trainer);
    tok.train(&mut trainer, texts)
        .map_err(|e| anyhow!("training WordPiece: {e}"))?;
    let cls = tok
        .token_to_id("[CLS]")
        .ok_or_else(|| anyhow!("trained vocabulary lacks [CLS]"))?;
    let sep = tok
        .token_to_id("[SEP]")
        .ok_or_else(|| anyhow!("trained vocabulary lacks [SEP]"))?;
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tok)
}

/// Loads a `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))
}

/// Saves a tokenizer as `tokenizer.json` atomically.
pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow!("serialising tokenizer: {e}"))?;
    crate::shard::write_atomic(path, json.as_bytes())
        .with_context(|| format!("saving tokenizer {}", path.display()))
}

/// Encodes `text` with special tokens into at most `ctx` ids. When truncated, the last kept
/// id is the final special token (`[SEP]`), as BERT truncation does. Returns the ids and
/// whether truncation happened.
pub fn encode(tok: &Tokenizer, text: &str, ctx: usize) -> Result<(Vec<u32>, bool)> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow!("tokenising {text:?}: {e}"))?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() <= ctx {
        return Ok((ids, false));
    }
    let last = ids.last().copied().unwrap_or(0);
    let ends_special = enc.get_special_tokens_mask().last() == Some(&1);
    ids.truncate(ctx);
    if ends_special && ctx > 0 {
        ids[ctx - 1] = last;
    }
    Ok((ids, true))
}
