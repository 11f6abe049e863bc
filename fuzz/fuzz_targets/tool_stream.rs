#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| taipan_fuzz::tool_stream(data));
