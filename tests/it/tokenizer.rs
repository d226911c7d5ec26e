//! The real Qwen3 tokenizer through the tokenizers crate reproduces Hugging Face's encodings.

use crate::common::fixture;
use laco_train::hf::Tokenizer;

#[test]
fn qwen3_tokenizer_matches_every_golden_case() {
    let tok = Tokenizer::from_file(&fixture("qwen3-tokenizer/tokenizer.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen3-tokenizer/golden.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tok.vocab_size() as u64,
        golden["vocab_size_with_added"].as_u64().unwrap()
    );
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "encoding of {text:?}");
    }
    assert_eq!(tok.encode("Hello world").unwrap(), vec![9707, 1879]);
}
