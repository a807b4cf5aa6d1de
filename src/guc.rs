//! Settings. The key defaults are USERSET: they shape keys a caller creates, nothing more. The
//! token settings are SUSET: a key holder who could set them would mint tokens for any audience
//! or lifetime, so only a superuser (or a role granted SET on them) changes them.

use crate::key_format;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use std::ffi::{c_char, c_void, CStr, CString};

pub static DEFAULT_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"sk"));
pub static DEFAULT_KEY_TTL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));

pub static MAX_TOKEN_TTL: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static USAGE_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static JWT_ISSUER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"pg_apikeys"));
pub static JWT_AUDIENCE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static TOKEN_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static TOKEN_CACHE_MEMORY: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);
pub static SHARED_KEYS: GucSetting<i32> = GucSetting::<i32>::new(131_072);
pub static CLIENT_IP_HEADER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ANALYTICS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ANALYTICS_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"90 days"));
pub static ANALYTICS_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(131_072);

/// Rejects a bad prefix at SET time rather than at the next create_api_key.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_prefix(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value (a C string or NULL).
    let value = unsafe {
        newval
            .as_ref()
            .filter(|p| !p.is_null())
            .map(|p| CStr::from_ptr(*p))
    };
    let ok = value
        .and_then(|v| v.to_str().ok())
        .is_some_and(key_format::is_valid_prefix);
    if !ok {
        // What GUC_check_errdetail() does: PostgreSQL adds it to its "invalid value" error.
        // SAFETY: check hooks may set this global; pstrdup copies into the current context.
        unsafe {
            pg_sys::GUC_check_errdetail_string =
                pg_sys::pstrdup(c"A key prefix is 1 to 16 characters of [a-z0-9].".as_ptr());
        }
    }
    ok
}

pub fn init() {
    // SAFETY: _PG_init defines each setting once per process; the hook is a plain function
    // that lives as long as the library.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"apikeys.default_prefix",
            c"Prefix of new API keys when create_api_key gets none.",
            c"1 to 16 characters of [a-z0-9].",
            &DEFAULT_PREFIX,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_prefix),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"apikeys.default_key_ttl",
        c"Lifetime of new API keys when create_api_key gets neither expires_in nor expires_at.",
        c"An interval such as '90 days'; empty means keys never expire.",
        &DEFAULT_KEY_TTL,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"apikeys.max_token_ttl",
        c"Longest lifetime mint_token grants.",
        c"In seconds unless a unit is given: '15min', '1h', '7d'.",
        &MAX_TOKEN_TTL,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"apikeys.jwt_issuer",
        c"The iss claim of minted tokens; verify_token accepts only this issuer.",
        c"",
        &JWT_ISSUER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"apikeys.jwt_audience",
        c"The aud claim of minted tokens; when set, verify_token requires it.",
        c"Empty: tokens carry no aud and any aud is accepted.",
        &JWT_AUDIENCE,
        GucContext::Suset,
        GucFlags::default(),
    );
    // USERSET: the cache only spares a backend work, it never changes an answer.
    GucRegistry::define_int_guc(
        c"apikeys.token_cache_size",
        c"Tokens whose signature and claims each backend remembers having checked.",
        c"At most this many, and at most apikeys.token_cache_memory; 0 checks every token from scratch.",
        &TOKEN_CACHE_SIZE,
        0,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"apikeys.token_cache_memory",
        c"Memory each backend's cache of checked tokens may use.",
        c"Counted as the claims' size plus about 300 bytes per token; 0 disables the cache.",
        &TOKEN_CACHE_MEMORY,
        0,
        i32::MAX / 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    // SUSET: a caller who could name the header would choose the address its allow-list sees.
    GucRegistry::define_string_guc(
        c"apikeys.client_ip_header",
        c"The request header whose first address authenticate_request checks allow-lists against.",
        c"For example x-forwarded-for behind a proxy. Unset: the connection's address (inet_client_addr()).",
        &CLIENT_IP_HEADER,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SUSET: a caller must not hide its verifications from the counts.
    GucRegistry::define_bool_guc(
        c"apikeys.analytics",
        c"Whether verifications are counted for apikeys.verification_stats.",
        c"Counted in shared memory and written in the background (needs shared_preload_libraries).",
        &ANALYTICS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"apikeys.analytics_retention",
        c"How long verification counts are kept (hours and days; minutes at most 7 days).",
        c"An interval such as '90 days'. Read by the background writer of each database.",
        &ANALYTICS_RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    // PostgreSQL allows server-start settings only while preloading, which is also the only
    // case in which the metering engine exists.
    // SAFETY: a plain read of a postmaster global, set before _PG_init runs.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"apikeys.shared_keys",
            c"Keys the metering engine holds in shared memory at once (about 330 bytes each).",
            c"Every database's keys in use share it. Keys with limits stay while used; keys without limits leave at each write, about every second.",
            &SHARED_KEYS,
            1024,
            1 << 24,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"apikeys.analytics_slots",
            c"Tallies of (key, code, minute) shared memory holds between writes (about 170 bytes each).",
            c"Tallies are written every five seconds, sooner when three-quarters of this are taken.",
            &ANALYTICS_SLOTS,
            1024,
            1 << 22,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"apikeys.usage_database",
            c"Ignored since pg_apikeys 0.6.0: every database's use is counted in shared memory.",
            c"Kept so that configurations written for earlier versions still load.",
            &USAGE_DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    // `SET apikeys.<typo>` then fails instead of creating a setting nothing reads (PostgreSQL 15
    // and later; 14 can only warn about placeholders that exist already).
    // SAFETY: called from _PG_init after our settings are defined, as PostgreSQL expects.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"apikeys".as_ptr())
    };
    // SAFETY: as above.
    #[cfg(feature = "pg14")]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"apikeys".as_ptr())
    };
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().trim().to_owned())
        .unwrap_or_default()
}

pub fn default_prefix() -> String {
    string(&DEFAULT_PREFIX)
}

/// The configured default lifetime, or None when it is empty (never expire).
pub fn default_key_ttl() -> Option<String> {
    Some(string(&DEFAULT_KEY_TTL)).filter(|s| !s.is_empty())
}

/// The longest token lifetime, in milliseconds.
pub fn max_token_ttl_ms() -> i64 {
    i64::from(MAX_TOKEN_TTL.get()) * 1000
}

pub fn jwt_issuer() -> String {
    string(&JWT_ISSUER)
}

pub fn jwt_audience() -> Option<String> {
    Some(string(&JWT_AUDIENCE)).filter(|s| !s.is_empty())
}

pub fn token_cache_size() -> usize {
    usize::try_from(TOKEN_CACHE_SIZE.get()).unwrap_or(0)
}

/// The token cache's memory bound, in bytes.
pub fn token_cache_bytes() -> usize {
    usize::try_from(TOKEN_CACHE_MEMORY.get())
        .unwrap_or(0)
        .saturating_mul(1024)
}

/// Slots of the metering engine's shared table.
pub fn shared_keys() -> usize {
    usize::try_from(SHARED_KEYS.get())
        .unwrap_or(16_384)
        .max(1024)
}

/// The header `authenticate_request` reads the client's address from; None: the connection's.
pub fn client_ip_header() -> Option<String> {
    Some(string(&CLIENT_IP_HEADER)).filter(|s| !s.is_empty())
}

pub fn analytics() -> bool {
    ANALYTICS.get()
}

/// How long counts are kept, as interval text (checked where it is used).
pub fn analytics_retention() -> String {
    Some(string(&ANALYTICS_RETENTION))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "90 days".into())
}

/// Slots of the analytics table in shared memory.
pub fn analytics_slots() -> usize {
    usize::try_from(ANALYTICS_SLOTS.get())
        .unwrap_or(131_072)
        .max(1024)
}
