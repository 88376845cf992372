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

/// The `internvl2_5` template (InternVL `conversation.py`; transformers' InternVL chat
/// template): system turn, user turn with one `<img>…</img>` block per image, assistant cue.
#[test]
fn chat_template_wraps_images_and_overrides_the_system_prompt() {
    use unifusion_model::vlm::processor::{DEFAULT_SYSTEM_PROMPT, chat_prompt};

    let prompt = chat_prompt(Some("Describe the target image."), "a cat", &[2, 1], 3);
    let want = format!(
        "<|im_start|>system\nDescribe the target image.<|im_end|>\n<|im_start|>user\n\
         <img>{}</img>\n<img>{}</img>\na cat<|im_end|>\n<|im_start|>assistant\n",
        "<IMG_CONTEXT>".repeat(6),
        "<IMG_CONTEXT>".repeat(3),
    );
    assert_eq!(prompt, want);
    assert!(chat_prompt(None, "x", &[], 256).contains(DEFAULT_SYSTEM_PROMPT));

    // Every image token is one id, so the scatter finds exactly tiles × tokens slots.
    let tokenizer = VlmTokenizer::from_bytes(TOKENIZER.as_bytes()).expect("fixture tokenizer");
    let ids = tokenizer.encode(&prompt).expect("encode");
    let count = |token: &str| {
        let id = tokenizer.token_id(token).expect("special token");
        ids.iter().filter(|&&i| i == id).count()
    };
    assert_eq!(count("<IMG_CONTEXT>"), 9);
    assert_eq!(count("<img>"), 2);
    assert_eq!(count("</img>"), 2);
    assert_eq!(count("<|im_start|>"), 3);
}
