//! Event ids: UUID version 7 (RFC 9562), a millisecond timestamp and random bits, so ids
//! are unique without coordination between replicas and sort roughly by time.

/// A new event id, e.g. `0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f`.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_unique_and_ordered_by_time() {
        let ids: Vec<String> = (0..10_000).map(|_| new_event_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 36, "{id}");
            assert_eq!(&id[14..15], "7", "version of {id}");
            assert!(
                matches!(&id[19..20], "8" | "9" | "a" | "b"),
                "variant of {id}"
            );
        }
        // Within a process, later ids sort after earlier ones.
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
