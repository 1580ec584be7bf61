//! Rate limiting for log lines a guest (or a host client) can trigger at
//! will: a hostile guest must not be able to flood the VMM's log.

use std::fmt;
use std::time::{Duration, Instant};

/// Lines allowed per window; the rest are counted and summarised.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether one more line may be logged now.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let window_over = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if window_over {
            if self.suppressed > 0 {
                log::warn!(
                    "vsock: {} similar messages suppressed in the last second",
                    self.suppressed
                );
                self.suppressed = 0;
            }
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Logs a warning about bad input, rate limited.
    pub fn warn(&mut self, args: fmt::Arguments<'_>) {
        if self.allow() {
            log::warn!("vsock: {args}");
        }
    }

    /// Logs a routine event at debug level, rate limited.
    pub fn debug(&mut self, args: fmt::Arguments<'_>) {
        if log::log_enabled!(log::Level::Debug) && self.allow() {
            log::debug!("vsock: {args}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_suppresses() {
        let mut l = LogLimiter::new();
        let allowed = (0..100).filter(|_| l.allow()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed, 100 - u64::from(BURST));
    }
}
