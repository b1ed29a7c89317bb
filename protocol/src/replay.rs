//! Sliding replay window over sequence numbers, kept by relay B per pair.
//!
//! The window remembers the highest accepted `seq` and which of the `size` numbers below it were
//! accepted. A `seq` that was accepted before, or that is `size` or more below the highest, is
//! rejected. Relay A allocates `seq` in increasing order, so only exchanges that overtake each
//! other by more than `size` positions can be rejected wrongly.

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Replay window of one pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    size: u64,
    highest: u64,
    /// Bit `i` of the window set means `highest - i` was accepted.
    bits: Vec<u64>,
}

impl ReplayWindow {
    /// A window of `size` sequence numbers, rounded up to a multiple of 64 (at least 64).
    pub fn new(size: u64) -> Self {
        let words = size.max(64).div_ceil(64);
        Self { size: words * 64, highest: 0, bits: vec![0; words as usize] }
    }

    /// Accepts `seq` once and marks it, or rejects it. `seq` 0 is never valid.
    ///
    /// # Errors
    /// `Replayed` when `seq` was accepted before, `Stale` when it fell out of the window.
    pub fn check_and_mark(&mut self, seq: u64) -> Result<(), ProtocolError> {
        if seq == 0 {
            return Err(ProtocolError::Stale { seq });
        }
        if seq > self.highest {
            self.shift(seq - self.highest);
            self.highest = seq;
            self.set(0);
            return Ok(());
        }
        let offset = self.highest - seq;
        if offset >= self.size {
            return Err(ProtocolError::Stale { seq });
        }
        if self.get(offset) {
            return Err(ProtocolError::Replayed { seq });
        }
        self.set(offset);
        Ok(())
    }

    /// Highest accepted sequence number (0 before the first).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Sequence numbers the window covers, after rounding up to a multiple of 64.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn get(&self, offset: u64) -> bool {
        self.bits[(offset / 64) as usize] >> (offset % 64) & 1 == 1
    }

    fn set(&mut self, offset: u64) {
        self.bits[(offset / 64) as usize] |= 1 << (offset % 64);
    }

    /// Moves every mark `by` positions further from `highest`, dropping those that leave.
    fn shift(&mut self, by: u64) {
        if by >= self.size {
            self.bits.fill(0);
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let len = self.bits.len();
        for index in (0..len).rev() {
            let from = index.checked_sub(words);
            let high = from.map_or(0, |from| self.bits[from] << bits);
            let carry = match (from.and_then(|from| from.checked_sub(1)), bits) {
                (Some(lower), 1..) => self.bits[lower] >> (64 - bits),
                _ => 0,
            };
            self.bits[index] = high | carry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seq_is_accepted_once() {
        let mut window = ReplayWindow::new(1024);
        for seq in 1..=3000 {
            window.check_and_mark(seq).unwrap();
        }
        assert_eq!(window.check_and_mark(3000), Err(ProtocolError::Replayed { seq: 3000 }));
        assert_eq!(window.check_and_mark(2500), Err(ProtocolError::Replayed { seq: 2500 }));
    }

    #[test]
    fn out_of_order_within_window_is_accepted() {
        let mut window = ReplayWindow::new(1024);
        window.check_and_mark(100).unwrap();
        window.check_and_mark(90).unwrap();
        window.check_and_mark(165).unwrap();
        window.check_and_mark(99).unwrap();
        assert!(window.check_and_mark(90).is_err());
        assert!(window.check_and_mark(100).is_err());
    }

    #[test]
    fn seq_older_than_window_is_stale() {
        let mut window = ReplayWindow::new(64);
        window.check_and_mark(1000).unwrap();
        assert_eq!(window.check_and_mark(936), Err(ProtocolError::Stale { seq: 936 }));
        window.check_and_mark(937).unwrap();
        assert_eq!(window.check_and_mark(0), Err(ProtocolError::Stale { seq: 0 }));
    }

    #[test]
    fn marks_survive_shifts_across_words() {
        let mut window = ReplayWindow::new(256);
        for seq in [1, 63, 64, 65, 130] {
            window.check_and_mark(seq).unwrap();
        }
        window.check_and_mark(200).unwrap();
        for seq in [63, 64, 65, 130] {
            assert_eq!(window.check_and_mark(seq), Err(ProtocolError::Replayed { seq }));
        }
        for seq in [2, 62, 66, 129, 131, 199] {
            window.check_and_mark(seq).unwrap();
        }
    }
}
