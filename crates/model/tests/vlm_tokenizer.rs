//! The VLM tokenizer (the `tokenizers` crate over tokenizer.json bytes) against the ids PyPI
//! `tokenizers` gives for the same file (tests/fixtures/vlm, made by
//! scripts/fixtures/make_vlm_fixtures.py), and the internvl2_5 chat template around it.

use unifusion_model::vlm::processor::VlmTokenizer;

const TOKENIZER: &str = include_str!("../../../tests/fixtures/vlm/tokenizer.json");
const CASES: &str = include_str!("../../../tests/fixtures/vlm/tokenizer_cases.json");

#[test]
fn ids_match_the_python_tokenizer() {
    let tokenizer = VlmTokenizer::from_bytes(TOKENIZER.as_bytes()).expect("fixture tokenizer");
    let cases: serde_json::Value = serde_json::from_str(CASES).expect("fixture cases");
    let cases = cases.as_array().expect("a list of cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(tokenizer.encode(text).expect("encode"), want, "{text:?}");
    }
}

#[test]
fn special_tokens_are_single_ids_and_skipped_when_decoding() {
    let tokenizer = VlmTokenizer::from_bytes(TOKENIZER.as_bytes()).expect("fixture tokenizer");
    let im_end = tokenizer
        .token_id("<|im_end|>")
        .expect("<|im_end|> is a token");
    let ids = tokenizer.encode("héllo<|im_end|>").expect("encode");
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(tokenizer.decode(&ids).expect("decode"), "héllo");
}

#[test]
fn malformed_tokenizer_json_is_an_error() {
    for bad in ["", "{", "{\"model\": 3}", "[]"] {
        assert!(VlmTokenizer::from_bytes(bad.as_bytes()).is_err(), "{bad:?}");
    }
}
