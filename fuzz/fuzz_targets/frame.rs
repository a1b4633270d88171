#![no_main]
use libfuzzer_sys::fuzz_target;
use lorastream::lorawan::{frame, mac};
use lorastream::model::AesKey;

fuzz_target!(|data: &[u8]| {
    let k = AesKey([1; 16]);
    let _ = frame::peek_data_up(data);
    let _ = frame::mic_ok(data, &k, 0);
    let _ = frame::decrypt(data, &k, &k, 0);
    let _ = frame::open_downlink(data, &k, &k, 0);
    let _ = mac::parse_uplink(data);
    let _ = mac::parse_downlink(data);
});
