//! The configured JSON paths (`$.data[*].id`) and their selection over any JSON answer.
//! Input: a path, a NUL byte, then the JSON document.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sparbar::attribute::jsonpath::JsonPath;

fuzz_target!(|data: &[u8]| {
    let (path, doc) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    let Ok(p) = JsonPath::parse(path) else {
        return;
    };
    // A parsed path shows back as text that parses to the same path.
    let again = JsonPath::parse(&p.to_string()).expect("a shown path parses");
    assert_eq!(again.to_string(), p.to_string());
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(doc) else {
        return;
    };
    let all = p.select(&v);
    assert_eq!(p.first(&v).is_some(), !all.is_empty());
    let _ = p.first_id(&v);
});
