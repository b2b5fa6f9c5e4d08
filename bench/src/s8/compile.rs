//! S8, compile part: `sallyport_operator::compile::compile` over a generated fleet,
//! timed several times, and the size of what it produces.

use std::time::Instant;

use serde::Serialize;

use super::fleet;
use crate::error::BenchError;
use crate::stats::Spread;

/// What the compile part measured.
#[derive(Clone, Debug, Serialize)]
pub struct CompileReport {
    /// Apps in the generated fleet.
    pub apps: usize,
    /// Timed compiles.
    pub runs: usize,
    /// Routes in the compiled configuration.
    pub routes: usize,
    /// Policies in the compiled configuration.
    pub policies: usize,
    /// `compile(&inputs)`: resolve, validate, sort, hash (no IO).
    pub compile: Spread,
    /// `FleetConfig::to_gzip_json()`: serialize and compress, as the operator stores it.
    pub gzip: Spread,
    /// Size of the compact JSON.
    pub json_bytes: usize,
    /// Size of the gzip-compressed JSON, as stored in the ConfigMap.
    pub gzip_bytes: usize,
}

/// Generates a fleet of `apps` apps, then compiles and compresses it `runs` times.
pub fn run(apps: usize, runs: usize) -> Result<CompileReport, BenchError> {
    eprintln!("S8 compile: generating a fleet of {apps} apps");
    let fleet = fleet::generate(apps)?;
    let inputs = fleet.inputs();
    let mut compile_times = Vec::with_capacity(runs);
    let mut gzip_times = Vec::with_capacity(runs);
    let mut last = None;
    for run in 1..=runs {
        let started = Instant::now();
        let compiled = sallyport_operator::compile::compile(&inputs)?;
        let compile_time = started.elapsed();
        let started = Instant::now();
        let gzip = compiled
            .config
            .to_gzip_json()
            .map_err(|error| BenchError::Encode(error.to_string()))?;
        let gzip_time = started.elapsed();
        eprintln!("S8 compile: run {run}/{runs}: compile {compile_time:.1?}, gzip {gzip_time:.1?}");
        compile_times.push(compile_time);
        gzip_times.push(gzip_time);
        last = Some((compiled, gzip));
    }
    let (Some((compiled, gzip)), Some(compile), Some(gzip_spread)) =
        (last, Spread::of(&compile_times), Spread::of(&gzip_times))
    else {
        return Err(BenchError::Fixture {
            what: "the compile benchmark".into(),
            message: "at least one run is needed".into(),
        });
    };
    if !compiled.skipped.is_empty() || compiled.config.routes.len() != apps {
        return Err(BenchError::UnexpectedCompile {
            apps,
            routes: compiled.config.routes.len(),
            skipped: compiled.skipped.len(),
            first_skipped: compiled
                .skipped
                .first()
                .map(|s| format!("{} {}: {}", s.kind, s.id, s.reason))
                .unwrap_or_default(),
        });
    }
    let json = serde_json::to_vec(&compiled.config)
        .map_err(|error| BenchError::Encode(error.to_string()))?;
    Ok(CompileReport {
        apps,
        runs,
        routes: compiled.config.routes.len(),
        policies: compiled.config.policies.len(),
        compile,
        gzip: gzip_spread,
        json_bytes: json.len(),
        gzip_bytes: gzip.len(),
    })
}
