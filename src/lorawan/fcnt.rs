//! Frame-counter reconstruction (LoRaWAN 1.0.x §4.3.1.5).
//!
//! Only the low 16 bits of FCntUp travel on air. The network keeps the full 32-bit value and
//! extends what it receives: a 16-bit value below the low half of the last counter means the
//! device rolled over into the next 64 Ki block. A gap larger than `MAX_FCNT_GAP` (16384, the
//! value of the 1.0 spec) is treated as an old frame, not as a jump forward.

/// The largest forward jump of the counter that is still accepted (LoRaWAN 1.0.x MAX_FCNT_GAP).
pub const MAX_FCNT_GAP: u32 = 16_384;

/// Result of checking an on-air counter against the last accepted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FCntCheck {
    /// New frame; the full 32-bit counter.
    Fresh(u32),
    /// Same counter as the last accepted frame (a retransmission or a replay).
    Repeat(u32),
    /// Older than the last accepted frame, or too far ahead to be trusted.
    Old,
}

/// Extend the 16-bit `on_air` counter with the state `last` (the last accepted full counter, or
/// `None` before the first frame) and classify it.
pub fn check(last: Option<u32>, on_air: u16) -> FCntCheck {
    let Some(last) = last else {
        return FCntCheck::Fresh(u32::from(on_air));
    };
    let candidate = (last & 0xFFFF_0000) | u32::from(on_air);
    let full = if candidate < last {
        // Low half went down: the device rolled over into the next 64 Ki block.
        match candidate.checked_add(0x1_0000) {
            Some(v) => v,
            None => return FCntCheck::Old,
        }
    } else {
        candidate
    };
    if full == last {
        FCntCheck::Repeat(full)
    } else if full - last > MAX_FCNT_GAP {
        FCntCheck::Old
    } else {
        FCntCheck::Fresh(full)
    }
}

/// The 32-bit counter the MIC must be computed with, before we know whether the frame is fresh:
/// the same extension as [`check`], used so that a MIC failure is told apart from a replay.
pub fn extend(last: Option<u32>, on_air: u16) -> u32 {
    match check(last, on_air) {
        FCntCheck::Fresh(v) | FCntCheck::Repeat(v) => v,
        FCntCheck::Old => {
            let last = last.unwrap_or(0);
            (last & 0xFFFF_0000) | u32::from(on_air)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_frame_is_taken_as_is() {
        assert_eq!(check(None, 0), FCntCheck::Fresh(0));
        assert_eq!(check(None, 42), FCntCheck::Fresh(42));
    }

    #[test]
    fn increments_and_replays() {
        assert_eq!(check(Some(10), 11), FCntCheck::Fresh(11));
        assert_eq!(check(Some(10), 10), FCntCheck::Repeat(10));
        assert_eq!(check(Some(10), 9), FCntCheck::Old);
        assert_eq!(
            check(Some(10), 10 + MAX_FCNT_GAP as u16),
            FCntCheck::Fresh(16_394)
        );
        assert_eq!(check(Some(10), 11 + MAX_FCNT_GAP as u16), FCntCheck::Old);
    }

    #[test]
    fn sixteen_bit_rollover() {
        assert_eq!(check(Some(0xFFFF), 0), FCntCheck::Fresh(0x1_0000));
        assert_eq!(check(Some(0xFFFE), 3), FCntCheck::Fresh(0x1_0003));
        assert_eq!(check(Some(0x1_FFFF), 1), FCntCheck::Fresh(0x2_0001));
        // After the rollover, the old low values are replays.
        assert_eq!(check(Some(0x1_0005), 0x0005), FCntCheck::Repeat(0x1_0005));
        assert_eq!(check(Some(0x1_0005), 0x0004), FCntCheck::Old);
        assert_eq!(extend(Some(0xFFFF), 0), 0x1_0000);
    }

    #[test]
    fn top_of_counter_space() {
        assert_eq!(check(Some(u32::MAX), 0), FCntCheck::Old);
        assert_eq!(
            check(Some(u32::MAX - 1), 0xFFFF),
            FCntCheck::Fresh(u32::MAX)
        );
    }
}
