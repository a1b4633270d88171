#![no_main]
use libfuzzer_sys::fuzz_target;
use lorastream::ingress::gwmp;

fuzz_target!(|data: &[u8]| {
    if let Ok(gwmp::Datagram::PushData { body, gateway, .. }) = gwmp::decode(data) {
        let _ = gwmp::parse_push_data(body, gateway);
    }
    let _ = lorastream::ingress::gwmp::tx_ack_result(data);
});
