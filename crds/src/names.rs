//! Broker object names derived from a ReliableQueue's work queue name.
//!
//! For a work queue `Q`: the retry exchange is `Q.retry`, each delay tier is a
//! queue `Q.retry.<delay>` (for example `orders.retry.4s`), and the parking
//! lot defaults to `Q.parked`.

use std::time::Duration;

/// The retry exchange of queue `queue`: `Q.retry`.
pub fn retry_exchange(queue: &str) -> String {
    format!("{queue}.retry")
}

/// The delay queue for one tier: `Q.retry.<delay>`, with the delay written
/// by [`format_delay`].
pub fn retry_tier_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", format_delay(delay))
}

/// The routing key under which the tier queue for `delay` is bound to the
/// retry exchange: the delay as [`format_delay`] writes it (`4s`).
pub fn retry_tier_routing_key(delay: Duration) -> String {
    format_delay(delay)
}

/// The default parking lot of queue `queue`: `Q.parked`.
pub fn parking_lot(queue: &str) -> String {
    format!("{queue}.parked")
}

/// Writes a delay the way tier names carry it: the largest unit that divides
/// it exactly (`1h`, `5m`, `4s`, `250ms`), so names stay short and stable.
pub fn format_delay(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(retry_exchange("orders"), "orders.retry");
        assert_eq!(
            retry_tier_queue("orders", Duration::from_secs(4)),
            "orders.retry.4s"
        );
        assert_eq!(parking_lot("orders"), "orders.parked");
        assert_eq!(retry_tier_routing_key(Duration::from_secs(4)), "4s");
    }

    #[test]
    fn delays_use_the_largest_exact_unit() {
        assert_eq!(format_delay(Duration::from_millis(250)), "250ms");
        assert_eq!(format_delay(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_delay(Duration::from_secs(90)), "90s");
        assert_eq!(format_delay(Duration::from_secs(120)), "2m");
        assert_eq!(format_delay(Duration::from_secs(7200)), "2h");
        assert_eq!(format_delay(Duration::ZERO), "0ms");
    }
}
