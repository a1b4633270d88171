//! The direct reader against the crate's serde types: whenever `read` answers, the crate
//! reads the same body to the same fields; and it does answer for the usual bodies.

use super::read;
use crate::ingress::gwmp::{fields, RxFields};
use semtech_udp::push_data::{Data, Stat};

/// Entries and stat (as its `Debug` text: `Stat` has no `PartialEq`).
type Read = (Vec<RxFields>, Option<String>);

fn crate_reads(body: &[u8]) -> Option<Read> {
    let d: Data = serde_json::from_slice(body).ok()?;
    let entries = d.rxpk.unwrap_or_default().iter().map(fields).collect();
    Some((entries, d.stat.map(|s| format!("{s:?}"))))
}

fn fast_reads(body: &[u8]) -> Option<Read> {
    let b = read(body)?;
    let stat = match b.stat {
        None => None,
        Some(raw) => serde_json::from_str::<Option<Stat>>(raw).ok()?,
    };
    Some((b.entries, stat.map(|s| format!("{s:?}"))))
}

/// xorshift64*, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Values per member: the first `good` are valid JSON the reader must take; the rest are
/// odd or wrong in ways the crate may or may not accept.
struct Menu {
    name: &'static str,
    good: usize,
    values: &'static [&'static str],
}

const MENUS: &[Menu] = &[
    Menu {
        name: "chan",
        good: 3,
        values: &[
            "2",
            "0",
            "7",
            "-1",
            "1.0",
            "01",
            "1e2",
            "4294967296",
            "12345678901234567890",
        ],
    },
    Menu {
        name: "rfch",
        good: 2,
        values: &["0", "1", "-0", "1.5", "null", "\"0\""],
    },
    Menu {
        name: "freq",
        good: 6,
        values: &[
            "868.1",
            "868.3",
            "867.9",
            "868",
            "923.299999",
            "868.100000",
            "868.1000005",
            "-1.5",
            "8.681e2",
            "868.",
            "-0",
            "902.2999999999999",
            "868.10000000000001",
        ],
    },
    Menu {
        name: "lsnr",
        good: 5,
        values: &[
            "9.5",
            "-7.2",
            "10",
            "-20.25",
            "0.1",
            "-0",
            "1e1",
            "0.1234567890123456",
            "x",
        ],
    },
    Menu {
        name: "rssi",
        good: 4,
        values: &[
            "-57",
            "-120",
            "0",
            "57",
            "-0",
            "-2147483649",
            "-1.0",
            "\"-57\"",
        ],
    },
    Menu {
        name: "size",
        good: 2,
        values: &["4", "23", "-1", "0.5"],
    },
    Menu {
        name: "stat",
        good: 3,
        values: &["1", "0", "-1", "2", "-0", "1.0", "true"],
    },
    Menu {
        name: "tmst",
        good: 3,
        values: &["2000123", "4294967295", "0", "4294967296", "-5"],
    },
    Menu {
        name: "modu",
        good: 1,
        values: &["\"LORA\"", "\"FSK\"", "\"lora\"", "\"LO\\u0052A\""],
    },
    Menu {
        name: "datr",
        good: 5,
        values: &[
            "\"SF7BW125\"",
            "\"SF12BW125\"",
            "\"SF10BW500\"",
            "\"SF9BW250\"",
            "\"SF7BW7\"",
            "\"SF13BW125\"",
            "\"SF7\"",
            "\"\"",
            "50000",
            "\"SF9BW125x\"",
            "\"SF7\\u0042W125\"",
        ],
    },
    Menu {
        name: "codr",
        good: 5,
        values: &[
            "\"4/5\"", "\"4/6\"", "\"4/7\"", "\"4/8\"", "\"OFF\"", "\"4/9\"", "null",
        ],
    },
    Menu {
        name: "data",
        good: 3,
        values: &[
            "\"QAECAw==\"",
            "\"QAEAACYAAQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGg==\"",
            "\"\"",
            "\"QAECAw=\"",
            "\"QAECAw\"",
            "\"!!\"",
            "\"QAEC\\nAw==\"",
        ],
    },
];

/// Optional members of `RxPkV1` and members it does not have (ignored by both readers).
const OPTIONAL: &[(&str, usize, &[&str])] = &[
    (
        "time",
        3,
        &[
            "\"2022-03-31T07:51:15.709338Z\"",
            "null",
            "\"\"",
            "\"a\\\"b\"",
            "5",
        ],
    ),
    ("rssis", 3, &["-60", "null", "-7", "-0", "\"x\""]),
    ("tmms", 2, &["1332441092000", "null", "-1.5e3"]),
    ("delayed", 2, &["false", "true", "nul"]),
    (
        "foo",
        3,
        &["{\"a\":[1,2,{\"b\":null}]}", "[]", "{}", "[1,]", "{\"a\"}"],
    ),
    (
        "rsig",
        1,
        &["[{\"ant\":0,\"chan\":7,\"lsnr\":7.8,\"rssic\":-103}]"],
    ),
];

const STATS: &[&str] = &[
    "null",
    r#"{"time":"2026-11-22 10:00:00 GMT","rxnb":2,"rxok":2,"rxfw":2,"ackr":100.0,"dwnb":0,"txnb":0}"#,
    r#"{"time":"2026-11-22 10:00:00 GMT","lati":46.24,"long":3.25,"alti":145,"rxnb":2,"rxok":2,"rxfw":2,"ackr":100.0,"dwnb":0,"txnb":0}"#,
    r#"{"rxnb":"x"}"#,
    "[1]",
];

const SPACES: &[&str] = &["", "", "", " ", "\n  ", "\t", "\r\n"];

/// One generated body, and whether every choice in it was a good one.
fn body(rng: &mut Rng, odd_percent: usize) -> (String, bool) {
    let mut clean = true;
    let sp = |rng: &mut Rng| SPACES[rng.below(SPACES.len())];
    let mut out = String::new();
    out.push_str(sp(rng));
    out.push('{');
    let mut top: Vec<String> = Vec::new();
    let entries = 1 + rng.below(3);
    let mut rxpk = String::from("[");
    for e in 0..entries {
        let mut members: Vec<String> = Vec::new();
        for m in MENUS {
            if rng.chance(odd_percent / 4) {
                clean = false; // a required member left out
                continue;
            }
            let i = if rng.chance(odd_percent) {
                rng.below(m.values.len())
            } else {
                rng.below(m.good)
            };
            clean &= i < m.good;
            members.push(format!(
                "\"{}\"{}:{}{}",
                m.name,
                sp(rng),
                sp(rng),
                m.values[i]
            ));
        }
        for (name, good, values) in OPTIONAL {
            if rng.chance(30) {
                let i = if rng.chance(odd_percent) {
                    rng.below(values.len())
                } else {
                    rng.below(*good)
                };
                clean &= i < *good && *name != "rsig";
                members.push(format!("\"{name}\":{}", values[i]));
            }
        }
        if rng.chance(odd_percent / 4) && !members.is_empty() {
            clean = false; // a member twice
            let dup = members[rng.below(members.len())].clone();
            members.push(dup);
        }
        // Any order.
        for i in (1..members.len()).rev() {
            members.swap(i, rng.below(i + 1));
        }
        if e > 0 {
            rxpk.push(',');
        }
        rxpk.push_str(sp(rng));
        rxpk.push('{');
        rxpk.push_str(&members.join(&format!(",{}", sp(rng))));
        rxpk.push('}');
    }
    rxpk.push(']');
    top.push(format!("\"rxpk\":{}{rxpk}", sp(rng)));
    if rng.chance(40) {
        let n = if rng.chance(odd_percent) {
            STATS.len()
        } else {
            3
        };
        let i = rng.below(n);
        clean &= i < 3;
        top.push(format!("\"stat\":{}", STATS[i]));
    }
    if rng.chance(10) {
        top.push("\"extra\":{\"k\":[true,false,null,1.5,\"s\"]}".into());
    }
    if top.len() > 1 && rng.chance(50) {
        top.swap(0, 1);
    }
    out.push_str(&top.join(","));
    out.push_str(sp(rng));
    out.push('}');
    out.push_str(sp(rng));
    (out, clean)
}

#[test]
fn the_usual_bodies_are_read_directly_and_as_the_crate_reads_them() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut clean_bodies = 0;
    for n in 0..5_000 {
        let (b, clean) = body(&mut rng, 0);
        let fast = fast_reads(b.as_bytes());
        if clean {
            clean_bodies += 1;
            assert!(
                fast.is_some(),
                "case {n}: the reader declined a usual body: {b}"
            );
        }
        assert_eq!(fast, crate_reads(b.as_bytes()), "case {n}: {b}");
    }
    assert!(clean_bodies > 2_000, "{clean_bodies}");
}

#[test]
fn odd_bodies_are_read_as_the_crate_reads_them_or_left_to_it() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut fast_took, mut crate_took) = (0, 0);
    for n in 0..20_000 {
        let (b, clean) = body(&mut rng, 6);
        let fast = fast_reads(b.as_bytes());
        let slow = crate_reads(b.as_bytes());
        if clean {
            assert!(fast.is_some(), "case {n}: declined a usual body: {b}");
        }
        if fast.is_some() {
            fast_took += 1;
            assert_eq!(fast, slow, "case {n}: {b}");
        }
        crate_took += usize::from(slow.is_some());
    }
    // Both kinds of case occur: the test exercises refusals and acceptances.
    assert!(fast_took > 2_000 && fast_took < 19_000, "{fast_took}");
    assert!(crate_took > fast_took, "{crate_took} {fast_took}");
}

#[test]
fn mutated_bodies_are_read_as_the_crate_reads_them_or_left_to_it() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut fast_took = 0;
    for n in 0..20_000 {
        let (b, _) = body(&mut rng, 0);
        let mut b = b.into_bytes();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(b.len());
            match rng.below(3) {
                0 => b[at] = b" \"{}[],:-.0123456789eEnulltrfasSFBW/=+\\"[rng.below(38)],
                1 => {
                    b.remove(at);
                }
                _ => b.insert(at, b[at]),
            }
        }
        let fast = fast_reads(&b);
        if fast.is_some() {
            fast_took += 1;
            assert_eq!(
                fast,
                crate_reads(&b),
                "case {n}: {}",
                String::from_utf8_lossy(&b)
            );
        }
    }
    assert!(fast_took > 100, "{fast_took}");
}

#[test]
fn what_forwarders_send() {
    // lora_pkt_fwd (SX1302 HAL 2.1), one frame with its fine timestamp fields left out.
    let sx1302 = r#"{"rxpk":[{"jver":1,"tmst":3512348611,"chan":2,"rfch":1,"freq":868.500000,"mid": 8,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","rssis":-59,"lsnr":9.8,"foff":-233,"rssi":-57,"size":23,"data":"QAEAACYAAQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGg=="}]}"#;
    // The legacy SX1301 forwarder, with a stat member.
    let sx1301 = r#"{"rxpk":[{"tmst":2000123,"time":"2026-12-03T18:00:00.000000Z","chan":0,"rfch":0,"freq":868.100000,"stat":1,"modu":"LORA","datr":"SF12BW125","codr":"4/5","lsnr":-12.5,"rssi":-118,"size":4,"data":"QAECAw=="}],"stat":{"time":"2026-12-03 18:00:00 GMT","rxnb":1,"rxok":1,"rxfw":1,"ackr":100.0,"dwnb":0,"txnb":0}}"#;
    for b in [sx1302, sx1301] {
        let fast = fast_reads(b.as_bytes()).expect(b);
        assert_eq!(Some(&fast), crate_reads(b.as_bytes()).as_ref());
    }
    let r = read(sx1302.as_bytes()).unwrap().entries.remove(0);
    assert_eq!((r.rssi, r.channel_rssi, r.snr), (-59, -57, 9.8));
    assert_eq!((r.channel, r.rf_chain, r.tmst), (2, 1, 3_512_348_611));
    assert_eq!(r.data.len(), 34);
    // A version-2 entry (rsig) is left to the crate.
    let v2 = r#"{"rxpk":[{"aesk":0,"brd":263,"codr":"4/5","data":"QAECAw==","datr":"SF12BW125","freq":868.5,"jver":2,"modu":"LORA","rsig":[{"ant":0,"chan":7,"lsnr":7.8,"rssic":-103}],"size":4,"stat":1,"tmst":445296860}]}"#;
    assert!(read(v2.as_bytes()).is_none());
    assert!(crate_reads(v2.as_bytes()).is_some());
    // Empty and null lists, an empty object.
    for b in [
        r#"{"rxpk":[]}"#,
        r#"{"rxpk":null}"#,
        "{}",
        r#" { "stat" : null } "#,
    ] {
        assert_eq!(fast_reads(b.as_bytes()), crate_reads(b.as_bytes()), "{b}");
        assert!(read(b.as_bytes()).is_some(), "{b}");
    }
    // A member name with an escape is a name serde_json reads unescaped: left to it.
    let rxpk = r#"{"tmst":2000123,"chan":2,"rfch":0,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","lsnr":9.5,"rssi":-57,"size":4,"data":"QAECAw=="}"#;
    for (from, to) in [
        ("\"chan\":2,", "\"ch\\u0061n\":2,"),
        ("\"chan\":2,", "\"chan\":2,\"ch\\u0061n\":3,"),
        ("\"size\"", "\"x\\u0000\":1,\"size\""),
        ("\"modu\":\"LORA\"", "\"modu\":\"LO\\u0052A\""),
    ] {
        let b = format!(r#"{{"rxpk":[{}]}}"#, rxpk.replacen(from, to, 1));
        assert!(b.contains('\\'), "{b}");
        assert!(read(b.as_bytes()).is_none(), "{b}");
    }
    let escaped_name = format!(
        r#"{{"rxpk":[{}]}}"#,
        rxpk.replacen("\"chan\"", "\"ch\\u0061n\"", 1)
    );
    assert_eq!(
        crate_reads(escaped_name.as_bytes()).map(|r| r.0[0].channel),
        Some(2)
    );
    // Deep nesting in an unknown member is left to serde_json (its own limit applies).
    let deep = format!(r#"{{"x":{}1{}}}"#, "[".repeat(40), "]".repeat(40));
    assert!(read(deep.as_bytes()).is_none());
    assert!(read("{\"rxpk\":[]}x".as_bytes()).is_none());
}
