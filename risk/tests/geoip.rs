//! The GeoIP database: a small City database written with `mmdb-writer` and read back
//! through the same reader the proxy uses; impossible travel between two of its places.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use sallyport_risk::{
    DetectionSettings, GeoDatabase, MemoryStore, RiskDetectionKind, RiskEngine, SignInAttempt,
    StoreSettings,
};
use serde::Serialize;

#[derive(Serialize)]
struct Names {
    en: &'static str,
}

#[derive(Serialize)]
struct City {
    city: CityName,
    country: Country,
    location: Location,
}

#[derive(Serialize)]
struct CityName {
    names: Names,
}

#[derive(Serialize)]
struct Country {
    iso_code: &'static str,
}

#[derive(Serialize)]
struct Location {
    latitude: f64,
    longitude: f64,
}

fn city(name: &'static str, country: &'static str, latitude: f64, longitude: f64) -> City {
    City {
        city: CityName {
            names: Names { en: name },
        },
        country: Country { iso_code: country },
        location: Location {
            latitude,
            longitude,
        },
    }
}

fn database() -> Vec<u8> {
    let mut writer = mmdb_writer::Writer::new("Sallyport-Test-City");
    let entries = [
        ("127.0.0.2/32", city("Paris", "FR", 48.8566, 2.3522)),
        ("127.0.0.3/32", city("Tokyo", "JP", 35.6762, 139.6503)),
        ("2001:db8::/32", city("Lyon", "FR", 45.764, 4.8357)),
    ];
    for (network, record) in &entries {
        let network: IpNet = network.parse().unwrap_or_else(|e| panic!("{network}: {e}"));
        writer
            .insert(network, record)
            .unwrap_or_else(|e| panic!("insert {network}: {e}"));
    }
    writer.to_bytes().unwrap_or_else(|e| panic!("write: {e}"))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn a_city_database_places_addresses() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("city.mmdb");
    std::fs::write(&path, database()).unwrap_or_else(|e| panic!("write: {e}"));
    let geo = GeoDatabase::open(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(geo.database_type(), "Sallyport-Test-City");
    let paris = geo
        .place(ip("127.0.0.2"))
        .unwrap_or_else(|| panic!("127.0.0.2 is in Paris"));
    assert_eq!(paris.country.as_deref(), Some("FR"));
    assert_eq!(paris.city.as_deref(), Some("Paris"));
    assert_eq!(paris.coordinates, Some((48.8566, 2.3522)));
    assert_eq!(
        geo.place(ip("::ffff:127.0.0.3")).and_then(|p| p.city),
        Some("Tokyo".to_owned()),
        "an IPv4-mapped address is looked up as IPv4"
    );
    assert_eq!(
        geo.place(ip("2001:db8::1")).and_then(|p| p.city),
        Some("Lyon".to_owned())
    );
    assert_eq!(geo.place(ip("127.0.0.1")), None);

    let garbage = dir.path().join("garbage.mmdb");
    std::fs::write(&garbage, b"not a database").unwrap_or_else(|e| panic!("write: {e}"));
    let error = GeoDatabase::open(&garbage)
        .err()
        .unwrap_or_else(|| panic!("garbage must not open"));
    assert!(error.to_string().contains("garbage.mmdb"), "{error}");
}

#[tokio::test]
async fn the_engine_detects_impossible_travel_between_two_cities() {
    let engine = RiskEngine::new(
        DetectionSettings::default(),
        Arc::new(MemoryStore::new(StoreSettings::default())),
    );
    engine.set_geo(Some(
        GeoDatabase::from_bytes("test", database()).unwrap_or_else(|e| panic!("{e}")),
    ));
    let at = |from: &str, now_ms: i64| SignInAttempt {
        user: "alice",
        ip: ip(from),
        platform: None,
        now_ms,
    };
    let t0 = 1_800_000_000_000;
    let first = engine.assess(&at("127.0.0.2", t0)).await;
    assert!(first.detections.is_empty(), "{:?}", first.detections);
    engine.record_sign_in("alice", &first).await;
    // Tokyo five minutes after Paris.
    let second = engine.assess(&at("127.0.0.3", t0 + 5 * 60_000)).await;
    let kinds: Vec<RiskDetectionKind> = second.detections.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, vec![RiskDetectionKind::ImpossibleTravel]);
    assert!(second.sign_in_risk.is_some());
    assert!(
        second.detections[0].detail.contains("Tokyo"),
        "{:?}",
        second.detections
    );
    // Bob has no history: nothing to travel from.
    let bob = engine
        .assess(&SignInAttempt {
            user: "bob",
            ..at("127.0.0.3", t0 + 5 * 60_000)
        })
        .await;
    assert!(bob.detections.is_empty(), "{:?}", bob.detections);
    // Without the database, no places: no travel.
    engine.set_geo(None);
    let blind = engine.assess(&at("127.0.0.3", t0 + 5 * 60_000)).await;
    assert!(blind.detections.is_empty(), "{:?}", blind.detections);
}
