//! The direct writer and reader against postcard: the writer's bytes are postcard's; whenever
//! `read` answers, postcard reads the same bytes to the same uplink; and it answers for every
//! record this version writes.

use super::{read, write, Cur};
use crate::model::{
    CodecOutput, CodingRateText, DevAddr, DevStatus, Eui64, JsonObject, Record, RxInfo, TxSettings,
    Uplink,
};
use crate::store::records;

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

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// A value of `bits` bits, often small, sometimes at the edges.
    fn int(&mut self, bits: u32) -> u128 {
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        let v = match self.below(5) {
            0 => self.below(128) as u128,
            1 => mask,
            2 => mask >> self.below(bits as usize),
            _ => (u128::from(self.next()) << 64 | u128::from(self.next())) & mask,
        };
        v & mask
    }

    fn text(&mut self) -> String {
        const PIECES: [&str; 8] = ["a", "farm-7", "Zähler", "温度", "🌡", " ", "\"", "x_y.z"];
        (0..self.below(6))
            .map(|_| PIECES[self.below(PIECES.len())])
            .collect()
    }
}

fn uplink(g: &mut Rng) -> Uplink {
    let rx = (0..g.below(5))
        .map(|_| RxInfo {
            gateway: Eui64::from_u64(g.next()),
            tmst: g.int(32) as u32,
            time: g.coin().then(|| g.text()),
            rssi: g.int(32) as u32 as i32,
            channel_rssi: -(g.below(140) as i32),
            snr: (g.below(400) as f32 - 200.0) / 8.0,
            channel: g.int(32) as u32,
            rf_chain: g.below(3) as u32,
            received_at_us: g.int(64) as u64 as i64,
        })
        .collect();
    let codec = match g.below(3) {
        0 => None,
        1 => Some(CodecOutput::Error(g.text())),
        _ => {
            let mut data = serde_json::Map::new();
            data.insert(g.text(), serde_json::json!(g.below(1000)));
            Some(CodecOutput::Decoded {
                data: JsonObject(data),
                warnings: (0..g.below(3)).map(|_| g.text()).collect(),
            })
        }
    };
    Uplink {
        id: g.int(128),
        received_at_us: g.int(64) as u64 as i64,
        application: g.text().into(),
        device: g.text().into(),
        dev_eui: Eui64::from_u64(g.next()),
        dev_addr: DevAddr(g.int(32) as u32),
        f_port: g.coin().then(|| g.below(256) as u8),
        f_cnt: g.int(32) as u32,
        confirmed: g.coin(),
        adr: g.coin(),
        payload: (0..g.below(300)).map(|_| g.below(256) as u8).collect(),
        settings: TxSettings {
            frequency_hz: g.int(32) as u32,
            spreading_factor: g.below(256) as u8,
            bandwidth_hz: g.int(32) as u32,
            coding_rate: CodingRateText::new(["", "4/5", "4/8", "4/6LI"][g.below(4)]),
        },
        rx,
        dev_status: g.coin().then(|| DevStatus {
            battery: g.below(256) as u8,
            margin: g.below(256) as u8 as i8,
            received_at_us: g.int(64) as u64 as i64,
        }),
        codec,
    }
}

/// Both readers on `rest` (a record after its `[TAG, VERSION]`): the direct one may decline,
/// but when it answers, postcard must read the same uplink (compared by its encoding: a
/// damaged `snr` can be NaN).
fn agree(rest: &[u8]) -> Option<Uplink> {
    let fast = read(rest)?;
    match postcard::from_bytes::<Record>(rest) {
        Ok(Record::Uplink(slow)) => {
            assert_eq!(
                records::encode(&Record::Uplink(slow)).ok(),
                records::encode(&Record::Uplink(fast.clone())).ok(),
                "the readers disagree on {rest:02x?}"
            );
        }
        other => panic!("read answered where postcard gives {other:?}: {rest:02x?}"),
    }
    Some(fast)
}

#[test]
fn writes_what_postcard_writes() {
    let mut g = Rng(0x5EED_0004);
    for _ in 0..5_000 {
        let u = uplink(&mut g);
        let mut ours = Vec::new();
        write(&u, &mut ours).unwrap();
        assert_eq!(
            ours,
            postcard::to_stdvec(&Record::Uplink(u.clone())).unwrap(),
            "{u:?}"
        );
    }
}

#[test]
fn reads_every_uplink_this_version_writes() {
    let mut g = Rng(0x5EED_0001);
    for _ in 0..5_000 {
        let u = uplink(&mut g);
        let bytes = records::encode(&Record::Uplink(u.clone())).unwrap();
        let fast = agree(&bytes[2..]).expect("the direct reader declined a fresh record");
        assert_eq!(fast, u);
        assert_eq!(records::decode(&bytes).unwrap(), Record::Uplink(u));
    }
}

#[test]
fn declines_or_agrees_on_damaged_records() {
    let mut g = Rng(0x5EED_0002);
    let (mut answered, mut declined) = (0, 0);
    for _ in 0..20_000 {
        let u = uplink(&mut g);
        let mut b = records::encode(&Record::Uplink(u)).unwrap()[2..].to_vec();
        for _ in 0..=g.below(3) {
            match g.below(4) {
                0 if !b.is_empty() => {
                    let i = g.below(b.len());
                    b[i] = g.below(256) as u8;
                }
                1 if !b.is_empty() => {
                    let i = g.below(b.len());
                    b[i] ^= 0x80;
                }
                2 => b.truncate(g.below(b.len() + 1)),
                _ => {
                    let i = g.below(b.len() + 1);
                    b.insert(i, g.below(256) as u8);
                }
            }
        }
        match agree(&b) {
            Some(_) => answered += 1,
            None => declined += 1,
        }
    }
    // Both outcomes happen: the test exercises the agreement, not only the declines.
    assert!(
        answered > 1_000 && declined > 1_000,
        "{answered} {declined}"
    );
}

#[test]
fn other_records_are_left_to_postcard() {
    let j = Record::Join(crate::model::Join {
        id: 7,
        received_at_us: 1,
        application: "a".into(),
        device: "d".into(),
        dev_eui: Eui64::from_u64(1),
        join_eui: Eui64::from_u64(2),
        dev_addr: DevAddr(3),
        settings: TxSettings {
            frequency_hz: 868_100_000,
            spreading_factor: 7,
            bandwidth_hz: 125_000,
            coding_rate: "4/5".into(),
        },
        rx: Vec::new(),
    });
    let bytes = records::encode(&j).unwrap();
    assert!(read(&bytes[2..]).is_none());
    assert_eq!(records::decode(&bytes).unwrap(), j);
}

/// Varints and zigzag integers exactly as postcard reads them, overlong and overflowing
/// encodings included.
#[test]
fn integers_as_postcard_reads_them() {
    let mut g = Rng(0x5EED_0003);
    for _ in 0..200_000 {
        let n = 1 + g.below(20);
        let b: Vec<u8> = (0..n)
            .map(|i| {
                let low = g.below(128) as u8;
                let more = i + 1 < n || g.below(8) == 0;
                // Mostly continuation bytes, ending in a small or large last byte.
                if more {
                    low | 0x80
                } else if g.coin() {
                    low & 0x03
                } else {
                    low
                }
            })
            .collect();
        assert_eq!(
            Cur(&b).u32(),
            postcard::from_bytes::<u32>(&b).ok(),
            "{b:02x?}"
        );
        assert_eq!(
            Cur(&b).u64(),
            postcard::from_bytes::<u64>(&b).ok(),
            "{b:02x?}"
        );
        assert_eq!(
            Cur(&b).u128(),
            postcard::from_bytes::<u128>(&b).ok(),
            "{b:02x?}"
        );
        assert_eq!(
            Cur(&b).i32(),
            postcard::from_bytes::<i32>(&b).ok(),
            "{b:02x?}"
        );
        assert_eq!(
            Cur(&b).i64(),
            postcard::from_bytes::<i64>(&b).ok(),
            "{b:02x?}"
        );
        // Lengths are `usize` varints: the `u64` limits on this 64-bit machine.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            Cur(&b).len(),
            postcard::from_bytes::<u64>(&b).ok().map(|v| v as usize),
            "{b:02x?}"
        );
    }
}
