//! Ring-buffer records as the reader decodes them: any bytes give an event or a counted reason.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sparbar::capture::decode::decode;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = decode(data) {
        // Every refusal has a reason for the drop counter's label.
        assert!(!e.reason().is_empty());
    }
});
