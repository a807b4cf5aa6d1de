//! pg_apikeys: API keys managed and verified inside PostgreSQL.
//! Each module is one concern; SQL functions live next to their tests.

use pgrx::prelude::*;

mod addresses;
mod analytics;
mod audit;
mod catalog;
pub mod claims;
mod context;
pub mod credits;
pub mod durations;
mod engine;
mod errors;
mod guc;
mod http;
mod identities;
mod jsonb;
pub mod key_format;
mod keys;
pub mod limits;
mod lookup;
pub mod metering;
pub mod network;
mod owner;
pub mod permissions;
mod plans;
mod ratelimit;
pub mod refills;
mod roles;
mod scan;
mod schema;
mod selfservice;
pub mod settings;
mod signing;
pub mod slots;
pub mod tallies;
mod test_support;
mod tokens;
mod verify;
mod writer;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    context::init();
    identities::init();
    // SAFETY: a plain read of a postmaster global, set before _PG_init runs.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        engine::init();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // The metering engine, as deployments run it.
        vec!["shared_preload_libraries = 'pg_apikeys'"]
    }
}
