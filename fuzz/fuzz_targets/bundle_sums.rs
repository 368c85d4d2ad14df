//! Fuzzes the `bundle_sums` reader: any bytes get a value or an error, never a panic or an abort.
#![no_main]

#[path = "../../tests/readers/mod.rs"]
mod readers;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = readers::bundle_sums(data);
});
