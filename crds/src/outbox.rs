//! How much an outbox volume can hold: the limit the sidecar enforces
//! (`--max-outbox-bytes`, answered with 507 when reached) must be reached
//! before the volume fills up, or publishes fail with a disk-full 500
//! instead. The operator derives the limit from the claim size it requests,
//! and the sidecar from the size of the filesystem its data dir is on, with
//! this one function.

/// Bytes the segment log adds to every record: the frame header (`u32`
/// length, `u32` crc32, `u64` sequence, `u8` kind).
pub const FRAME_OVERHEAD: u64 = 17;
/// Default size at which a segment is sealed (`--outbox-segment-bytes`).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default most messages held (`--max-outbox-messages`).
pub const DEFAULT_MAX_MESSAGES: u64 = 1_000_000;
/// Limit used when the volume is larger than it needs to be for it.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Fixed room kept for the checkpoint, directory entries and dead-letter
/// files' block rounding.
const FIXED_RESERVE: u64 = 8 << 20;

/// Which storage engine will write the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// The segment log: records plus a frame header each; besides the
    /// records, at most the segment being written and the oldest, partly
    /// acknowledged one hold dead bytes (stragglers are moved forward).
    Segment,
    /// sled: measured at about 1.5× the records' size on disk, up to twice
    /// while it rewrites.
    Sled,
    /// fjall: its tables, a journal of up to 64 MiB, and room to rewrite
    /// tables while it compacts; counted as for sled.
    Fjall,
}

/// The most record bytes (as `--max-outbox-bytes` counts them) a volume of
/// `volume_bytes` can hold: a tenth is left to the filesystem (journal,
/// blocks reserved for root, metadata), then what the engine needs besides
/// the records. `None` when the volume cannot hold even that.
pub fn max_bytes_for_volume(
    volume_bytes: u64,
    engine: EngineKind,
    segment_bytes: u64,
    max_messages: u64,
) -> Option<u64> {
    let usable = volume_bytes - volume_bytes / 10;
    let room = match engine {
        EngineKind::Segment => usable
            .checked_sub(2 * segment_bytes)?
            .checked_sub(FRAME_OVERHEAD.saturating_mul(max_messages))?
            .checked_sub(FIXED_RESERVE)?,
        EngineKind::Sled | EngineKind::Fjall => usable.checked_sub(FIXED_RESERVE)? / 2,
    };
    (room > 0).then_some(room)
}

/// Parses a Kubernetes quantity of bytes (`1Gi`, `500Mi`, `2G`, `1e9`,
/// `1073741824`) into bytes. Fractions are rounded up.
pub fn parse_bytes_quantity(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) && s[1..].parse::<i32>().is_ok() => {
            10f64.powi(s[1..].parse::<i32>().unwrap())
        }
        _ => {
            return Err(format!(
                "{q:?} is not a quantity of bytes (such as 1Gi or 500Mi)"
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{q:?} is not a quantity of bytes (such as 1Gi or 500Mi)"))?;
    let bytes = (n * multiplier).ceil();
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{q:?} is not a usable size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_bytes_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes_quantity("500Mi"), Ok(500 << 20));
        assert_eq!(parse_bytes_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes_quantity("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes_quantity("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes_quantity("4096"), Ok(4096));
        for bad in ["", "Gi", "1GB", "one", "1.2.3Gi", "0", "-1Gi"] {
            assert!(parse_bytes_quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_claim_holds_the_limit_with_room_for_the_engine() {
        let volume = parse_bytes_quantity("1Gi").unwrap();
        let limit = max_bytes_for_volume(
            volume,
            EngineKind::Segment,
            DEFAULT_SEGMENT_BYTES,
            DEFAULT_MAX_MESSAGES,
        )
        .unwrap();
        // Records at the limit, each with its frame, plus two segments of
        // dead bytes, fit in 90% of the volume.
        let worst = limit + FRAME_OVERHEAD * DEFAULT_MAX_MESSAGES + 2 * DEFAULT_SEGMENT_BYTES;
        assert!(worst <= volume - volume / 10, "{worst} > 90% of {volume}");
        // And the limit is not needlessly small.
        assert!(limit > volume / 2, "{limit}");
    }

    #[test]
    fn volumes_too_small_for_the_engine_are_refused() {
        assert_eq!(
            max_bytes_for_volume(100 << 20, EngineKind::Segment, 64 << 20, 1_000_000),
            None
        );
        assert!(max_bytes_for_volume(100 << 20, EngineKind::Sled, 64 << 20, 1_000_000).is_some());
        assert_eq!(
            max_bytes_for_volume(1 << 30, EngineKind::Fjall, 64 << 20, 1_000_000),
            max_bytes_for_volume(1 << 30, EngineKind::Sled, 64 << 20, 1_000_000)
        );
    }
}
