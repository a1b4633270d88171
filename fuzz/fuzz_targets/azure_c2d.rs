#![no_main]
use libfuzzer_sys::fuzz_target;
use lorastream::streams::azure::wire;

// A cloud-to-device message: the first line is the topic, the rest the body.
fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let topic = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let props = wire::parse_devicebound(&topic, "gw").unwrap_or_default();
    for raw in [false, true] {
        let _ = wire::downlink_request("fuzz", raw, None, &props, body);
        let _ = wire::downlink_request("fuzz", raw, Some(("a", "d")), &props, body);
    }
});
