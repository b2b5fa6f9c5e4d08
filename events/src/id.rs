//! Event ids: UUID version 7 (RFC 9562), a millisecond timestamp and 74 random bits,
//! so ids are unique without coordination between replicas and sort roughly by time.

use std::time::{SystemTime, UNIX_EPOCH};

/// A new event id, e.g. `0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f`.
pub fn new_event_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut random = [0u8; 10];
    if getrandom::fill(&mut random).is_err() {
        // No OS randomness (never seen on Linux): the thread-local generator, seeded
        // from it earlier or from the time, still makes collisions improbable.
        random = rand::random();
    }
    uuid_v7(millis, random)
}

/// The UUID v7 of `millis` (its low 48 bits) and `random` (74 of its bits are used).
fn uuid_v7(millis: u128, random: [u8; 10]) -> String {
    let mut bytes = [0u8; 16];
    let millis = (millis & 0xffff_ffff_ffff) as u64;
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&random);
    bytes[6] = 0x70 | (bytes[6] & 0x0f); // version 7
    bytes[8] = 0x80 | (bytes[8] & 0x3f); // variant 10
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_and_unique() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_event_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "7", "version of {id}");
            assert!(
                matches!(&id[19..20], "8" | "9" | "a" | "b"),
                "variant of {id}"
            );
        }
    }

    #[test]
    fn the_timestamp_leads() {
        let id = uuid_v7(0x0193_a4f2_5c1e, [0xff; 10]);
        assert_eq!(id, "0193a4f2-5c1e-7fff-bfff-ffffffffffff");
        let earlier = uuid_v7(1_000, [0; 10]);
        let later = uuid_v7(1_001, [0; 10]);
        assert!(earlier < later);
    }
}
