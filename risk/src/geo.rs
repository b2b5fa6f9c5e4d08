//! Where an IP address is: a MaxMind DB (GeoIP2/GeoLite2 City or Country, or any
//! database with their `country.iso_code` and `location.latitude`/`longitude` fields).

use std::net::IpAddr;
use std::path::Path;

use maxminddb::{Reader, geoip2};
use serde::{Deserialize, Serialize};

/// A GeoIP database could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the GeoIP database {path} is unusable (expected a MaxMind DB file, e.g. GeoLite2-City.mmdb): {source}"
)]
pub struct GeoError {
    /// The file.
    pub path: String,
    /// Why.
    pub source: maxminddb::MaxMindDbError,
}

/// Where the database places an address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Place {
    /// ISO 3166-1 country code, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The city's English name, when known (for logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Latitude and longitude in degrees, when known (City databases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinates: Option<(f64, f64)>,
}

impl Place {
    /// The place in words, for detection details.
    pub fn describe(&self) -> String {
        match (&self.city, &self.country) {
            (Some(city), Some(country)) => format!("{city}, {country}"),
            (Some(city), None) => city.clone(),
            (None, Some(country)) => country.clone(),
            (None, None) => "an unknown place".to_owned(),
        }
    }
}

/// A MaxMind-format GeoIP database, held in memory.
pub struct GeoDatabase {
    reader: Reader<Vec<u8>>,
    origin: String,
}

impl std::fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDatabase")
            .field("origin", &self.origin)
            .field("type", &self.reader.metadata.database_type)
            .finish()
    }
}

impl GeoDatabase {
    /// Reads the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let origin = path.display().to_string();
        let reader = Reader::open_readfile(path).map_err(|source| GeoError {
            path: origin.clone(),
            source,
        })?;
        Ok(Self { reader, origin })
    }

    /// The database in `bytes` (named `origin` in errors and logs).
    pub fn from_bytes(origin: &str, bytes: Vec<u8>) -> Result<Self, GeoError> {
        let reader = Reader::from_source(bytes).map_err(|source| GeoError {
            path: origin.to_owned(),
            source,
        })?;
        Ok(Self {
            reader,
            origin: origin.to_owned(),
        })
    }

    /// The database's type from its metadata (`GeoLite2-City` …).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata.database_type
    }

    /// Where `ip` is, if the database knows (IPv4-mapped addresses count as IPv4).
    pub fn place(&self, ip: IpAddr) -> Option<Place> {
        let record: geoip2::City<'_> = self.reader.lookup(ip.to_canonical()).ok()??;
        let country = record
            .country
            .as_ref()
            .and_then(|c| c.iso_code)
            .or_else(|| record.registered_country.as_ref().and_then(|c| c.iso_code))
            .map(str::to_owned);
        let city = record
            .city
            .as_ref()
            .and_then(|c| c.names.as_ref())
            .and_then(|names| names.get("en"))
            .map(|name| (*name).to_owned());
        let coordinates = record
            .location
            .as_ref()
            .and_then(|l| l.latitude.zip(l.longitude));
        let place = Place {
            country,
            city,
            coordinates,
        };
        (place != Place::default()).then_some(place)
    }
}

/// The great-circle distance between two points (latitude, longitude in degrees), in
/// kilometres (haversine, mean Earth radius).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_are_great_circles() {
        let paris = (48.8566, 2.3522);
        let new_york = (40.7128, -74.0060);
        let d = distance_km(paris, new_york);
        assert!(
            (5800.0..5880.0).contains(&d),
            "Paris–New York is about 5837 km, got {d}"
        );
        assert!(distance_km(paris, paris) < 1e-9);
    }
}
