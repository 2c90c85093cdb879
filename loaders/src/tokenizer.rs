//! Tokenizer: load a Hugging Face `tokenizer.json`, or train an uncased WordPiece vocabulary
//! (BERT normaliser and pre-tokeniser, `[CLS] … [SEP]` framing) from captions.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens of a trained vocabulary, in id order 0..=4.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains an uncased WordPiece tokenizer of at most `vocab_size` entries on `texts`.
///
/// The vocabulary is built deterministically (the same texts give the same ids in every run,
/// which the library's parallel, hash-ordered trainer does not guarantee): the special tokens,
/// then every character seen (as a word start and as a `##` continuation), then whole words by
/// decreasing count, ties by spelling. Words that do not fit fall back to character pieces.
/// The alphabet is always kept, so a very small `vocab_size` can be exceeded by it.
pub fn train_wordpiece<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use tokenizers::{
        NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        let text = text.as_ref();
        let mut n = NormalizedString::from(text);
        normalizer
            .normalize(&mut n)
            .map_err(|e| anyhow!("normalising {text:?}: {e}"))?;
        let mut pre = PreTokenizedString::from(n);
        BertPreTokenizer
            .pre_tokenize(&mut pre)
            .map_err(|e| anyhow!("pre-tokenising {text:?}: {e}"))?;
        for (w, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts.entry(w.to_string()).or_insert(0) += 1;
        }
    }
    let mut vocab: HashMap<String, u32> = HashMap::new();
    let push = |t: String, vocab: &mut HashMap<String, u32>| {
        let id = vocab.len() as u32;
        vocab.entry(t).or_insert(id);
    };
    for s in SPECIAL_TOKENS {
        push(s.to_string(), &mut vocab);
    }
    let alphabet: BTreeSet<char> = counts.keys().flat_map(|w| w.chars()).collect();
    for c in &alphabet {
        push(c.to_string(), &mut vocab);
        push(format!("##{c}"), &mut vocab);
    }
    let mut words: Vec<(&String, u64)> = counts
        .iter()
        .filter(|(w, _)| w.chars().count() > 1)
        .map(|(w, &c)| (w, c))
        .collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    for (w, _) in words {
        if vocab.len() >= vocab_size {
            break;
        }
        push(w.clone(), &mut vocab);
    }
    // `vocab.txt` form: one token per line, the line number is the id.
    let mut lines: Vec<(u32, String)> = vocab.into_iter().map(|(t, id)| (id, t)).collect();
    lines.sort();
    let txt: String = lines.into_iter().map(|(_, t)| t + "\n").collect();
    let vocab = WordPiece::read_bytes(txt.as_bytes())
        .map_err(|e| anyhow!("building WordPiece vocabulary: {e}"))?;
    let wp = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("building WordPiece: {e}"))?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(normalizer));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    tok.add_special_tokens(
        &SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(s.to_string(), true))
            .collect::<Vec<_>>(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_vocabulary_is_deterministic_and_keeps_whole_words() {
        let texts = [
            "Chest x-ray showing a pulmonary nodule.",
            "histology image, H&E stain.",
            "chest x-ray.",
            "Zebra",
        ];
        let a = train_wordpiece(texts.iter(), 64).unwrap();
        let b = train_wordpiece(texts.iter(), 64).unwrap();
        // Hash-ordered training gives different ids per instance; this must not.
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(a.token_to_id(s), Some(i as u32));
        }
        // The most frequent words ("chest", "x", "-", "ray", ".") fit as whole tokens.
        let (ids, _) = encode(&a, "chest x-ray.", 32).unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| a.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, ["[CLS]", "chest", "x", "-", "ray", ".", "[SEP]"]);
        // With no room for words, a word falls back to character pieces.
        let small = train_wordpiece(texts.iter(), 5).unwrap();
        let (ids, _) = encode(&small, "zebra", 32).unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| small.id_to_token(i).unwrap()).collect();
        assert_eq!(toks, ["[CLS]", "z", "##e", "##b", "##r", "##a", "[SEP]"]);
    }
}
