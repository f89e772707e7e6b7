use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use super::tokenizer::{split, PreFamily, LLAMA3_REGEX, QWEN2_REGEX};

fn pieces(regex: &str, text: &str) -> Vec<String> {
    let pre = split(regex).unwrap();
    let mut s = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut s).unwrap();
    s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(p, _, _)| p.to_string())
        .collect()
}

#[test]
fn families_by_their_gguf_names() {
    assert_eq!(PreFamily::from_pre("smollm"), Some(PreFamily::Smollm));
    assert_eq!(PreFamily::from_pre("qwen2"), Some(PreFamily::Qwen2));
    assert_eq!(PreFamily::from_pre("llama-bpe"), Some(PreFamily::Llama3));
    assert_eq!(PreFamily::from_pre("default"), Some(PreFamily::Gpt2));
    assert_eq!(PreFamily::from_pre("deepseek-llm"), None);
}

#[test]
fn digits_split_as_each_family_does() {
    assert_eq!(
        pieces(QWEN2_REGEX, "in 2024, it's"),
        ["in", " ", "2", "0", "2", "4", ",", " it", "'s"]
    );
    assert_eq!(
        pieces(LLAMA3_REGEX, "in 2024, it's"),
        ["in", " ", "202", "4", ",", " it", "'s"]
    );
}
