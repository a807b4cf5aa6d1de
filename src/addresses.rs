//! Client addresses as SQL sees them (SPEC §8): the `cidr[]` allow-lists management takes, the
//! `client_ip` a verification is given, and the address an HTTP request comes from (the header
//! `apikeys.client_ip_header` names, else the connection's). The matching is `network`'s.

use crate::network::{self, Cidr};
use crate::{errors, guc};
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable,
};
use pgrx::{FromDatum, IntoDatum};
use std::ffi::CStr;
use std::net::IpAddr;

/// A value of PostgreSQL's `cidr`, as its text (`10.0.0.0/8`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlCidr(pub String);

impl FromDatum for SqlCidr {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<SqlCidr> {
        if is_null {
            return None;
        }
        // SAFETY: the caller's contract: a non-null datum of type cidr (or inet: same layout).
        let text = unsafe { pgrx::direct_function_call::<&CStr>(pg_sys::cidr_out, &[Some(datum)]) };
        text.map(|t| SqlCidr(t.to_string_lossy().into_owned()))
    }
}

impl IntoDatum for SqlCidr {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        let text = std::ffi::CString::new(self.0).ok()?;
        // SAFETY: cidr_in takes a C string that outlives the call (it raises 22P02 on bad input).
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::cidr_in, &[text.as_c_str().into_datum()])
        }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::CIDROID
    }
}

// SAFETY: an array's elements are non-null cidr datums (nulls are told apart before unboxing),
// which FromDatum reads.
unsafe impl pgrx::datum::UnboxDatum for SqlCidr {
    type As<'src> = SqlCidr;
    unsafe fn unbox<'src>(datum: pgrx::datum::Datum<'src>) -> SqlCidr
    where
        Self: 'src,
    {
        // SAFETY: the trait's contract: a non-null cidr datum.
        unsafe { SqlCidr::from_datum(datum.sans_lifetime(), false) }
            .unwrap_or_else(|| SqlCidr(String::new()))
    }
}

// SAFETY: the SQL type named is cidr, whose values FromDatum/IntoDatum above read and make.
unsafe impl SqlTranslatable for SqlCidr {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(SqlCidr);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("cidr"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("cidr")));
}

/// An `allowed_cidrs` argument as text (PostgreSQL parsed every network); NULL elements are
/// refused (22023). An empty list stays empty: it means no allow-list.
pub fn argument(list: Option<Vec<Option<SqlCidr>>>) -> Option<Vec<String>> {
    let list = list?;
    if list.iter().any(Option::is_none) {
        errors::invalid_argument("allowed_cidrs", "must not contain NULL");
    }
    Some(list.into_iter().flatten().map(|c| c.0).collect())
}

/// What is stored for an allow-list given: NULL for an empty one.
pub fn stored(list: &[String]) -> Option<Vec<String>> {
    (!list.is_empty()).then(|| list.to_vec())
}

/// A stored allow-list, read: None for none. An entry that does not parse (it cannot: it is a
/// cidr) allows nothing rather than everything.
pub fn parse_list(list: Option<Vec<Option<String>>>) -> Option<Vec<Cidr>> {
    let list = list?;
    Some(
        list.into_iter()
            .flatten()
            .filter_map(|c| Cidr::parse(&c).ok())
            .collect(),
    )
}

/// Whose address a verification checks allow-lists against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// No allow-list applies: minting (a server-side call) and by-id peeks.
    Unchecked,
    /// The caller's address, None when none was given (a key with an allow-list is FORBIDDEN).
    At(Option<IpAddr>),
}

impl Client {
    /// From the `client_ip` argument of verify_key, verify_token and authenticate.
    pub fn from_arg(client_ip: Option<&pgrx::datum::Inet>) -> Client {
        Client::At(client_ip.and_then(|ip| network::parse_inet(&ip.0)))
    }

    /// Whether `list` (none: anywhere) lets this client in.
    pub fn allowed_by(&self, list: Option<&[Cidr]>) -> bool {
        match self {
            Client::Unchecked => true,
            Client::At(ip) => network::allows(list, *ip),
        }
    }
}

/// The address an HTTP request comes from: the first address of the header named by
/// `apikeys.client_ip_header` (header names case-insensitive; missing or malformed: none), or,
/// without that setting, the connection's peer (none over a unix socket).
pub fn of_request(headers: &serde_json::Value) -> Client {
    match guc::client_ip_header() {
        Some(name) => Client::At(
            headers
                .as_object()
                .and_then(|map| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)))
                .and_then(|(_, v)| v.as_str())
                .and_then(network::first_address),
        ),
        None => Client::At(connection_address()),
    }
}

/// `inet_client_addr()`: the connection's peer address, None over a unix socket.
fn connection_address() -> Option<IpAddr> {
    // SAFETY: inet_client_addr takes no arguments and returns NULL or an inet datum, read at once.
    let inet =
        unsafe { pgrx::direct_function_call::<pgrx::datum::Inet>(pg_sys::inet_client_addr, &[]) };
    inet.and_then(|ip| network::parse_inet(&ip.0))
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    fn at(ip: &str) -> String {
        format!("client_ip => '{ip}'")
    }

    #[pg_test]
    fn an_allow_list_lets_in_only_addresses_inside_it_of_both_families() {
        let (_, key) = create("allowed_cidrs => '{10.0.0.0/8, 2001:db8::/32}'");
        assert_eq!(code(&key, &at("10.1.2.3")), "VALID");
        assert_eq!(code(&key, &at("2001:db8:1::5")), "VALID");
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(code(&key, &at("::ffff:10.9.9.9")), "VALID");
        assert_eq!(code(&key, &at("192.168.0.1")), "FORBIDDEN");
        assert_eq!(code(&key, &at("2001:db9::1")), "FORBIDDEN");
        // No address given: a key with a list refuses.
        assert_eq!(code(&key, ""), "FORBIDDEN");
        assert_eq!(code(&key, "client_ip => NULL"), "FORBIDDEN");
        // A key without a list takes any address, and none.
        let (_, open) = create("");
        assert_eq!(code(&open, &at("192.168.0.1")), "VALID");
        assert_eq!(code(&open, ""), "VALID");
        assert!(
            field::<String>(&key, &at("1.1.1.1"), "key_id").is_some(),
            "FORBIDDEN names the key"
        );
    }

    #[pg_test]
    fn forbidden_comes_after_revoked_and_before_the_quota_and_spends_nothing() {
        let (id, key) = create("allowed_cidrs => '{10.0.0.0/8}', remaining => 1, rate_limit_max => 1, rate_limit_window => '1 hour'");
        assert_eq!(code(&key, &at("1.2.3.4")), "FORBIDDEN");
        assert_eq!(code(&key, &at("1.2.3.4")), "FORBIDDEN");
        // Neither the quota nor the window was touched by the refused calls.
        assert_eq!(
            field::<i64>(&key, &at("10.0.0.1"), "remaining"),
            Some(0),
            "the one unit of quota was still there"
        );
        assert_eq!(code(&key, &at("10.0.0.1")), "USAGE_EXCEEDED");
        assert_eq!(code(&key, &at("1.2.3.4")), "FORBIDDEN");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => false)"
        ));
        assert_eq!(code(&key, &at("1.2.3.4")), "DISABLED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(code(&key, &at("1.2.3.4")), "REVOKED");
        let (_, expired) =
            create("allowed_cidrs => '{10.0.0.0/8}', expires_at => now() - '1 s'::interval");
        assert_eq!(code(&expired, &at("1.2.3.4")), "EXPIRED");
    }

    #[pg_test]
    fn key_and_identity_lists_must_both_allow_the_address() {
        run("SELECT apikeys.create_identity('net_org', allowed_cidrs => '{10.0.0.0/8}')");
        let (_, key) = create("owner => 'net_org'");
        assert_eq!(code(&key, &at("10.0.0.1")), "VALID");
        assert_eq!(code(&key, &at("11.0.0.1")), "FORBIDDEN");
        let (_, narrow) =
            create("owner => 'net_org', allowed_cidrs => '{10.1.0.0/16, 12.0.0.0/8}'");
        assert_eq!(code(&narrow, &at("10.1.2.3")), "VALID");
        assert_eq!(
            code(&narrow, &at("10.2.0.1")),
            "FORBIDDEN",
            "outside the key's"
        );
        assert_eq!(
            code(&narrow, &at("12.0.0.1")),
            "FORBIDDEN",
            "outside the identity's"
        );
        assert_eq!(
            one::<String>("SELECT allowed_cidrs::text FROM apikeys.get_identity('net_org')")
                .as_deref(),
            Some("{10.0.0.0/8}")
        );
        run("SELECT apikeys.update_identity('net_org', clear => ARRAY['allowed_cidrs'])");
        assert_eq!(code(&key, &at("11.0.0.1")), "VALID");
        run("SELECT apikeys.update_identity('net_org', allowed_cidrs => '{11.0.0.0/8}')");
        assert_eq!(code(&key, &at("11.0.0.1")), "VALID");
        assert_eq!(code(&key, &at("10.0.0.1")), "FORBIDDEN");
    }

    #[pg_test]
    fn tokens_are_checked_where_they_are_verified_not_where_they_are_minted() {
        let (_, key) = create("allowed_cidrs => '{10.0.0.0/8}'");
        // Minting is a server-side call: no address, no allow-list.
        let token = mint(&key, "60000");
        assert_eq!(token_code(&token, &at("10.0.0.7")), "VALID");
        assert_eq!(token_code(&token, &at("8.8.8.8")), "FORBIDDEN");
        assert_eq!(token_code(&token, ""), "FORBIDDEN");
        assert_error(
            &format!("SELECT apikeys.authenticate('{key}', client_ip => '8.8.8.8')"),
            "28000",
            "FORBIDDEN",
        );
        run(&format!(
            "SELECT apikeys.authenticate('{key}', client_ip => '10.0.0.7')"
        ));
        assert!(one::<String>("SELECT apikeys.current_key_id()").is_some());
    }

    #[pg_test]
    fn allow_lists_are_managed_cleared_and_checked() {
        let (id, key) = create("allowed_cidrs => '{10.0.0.0/8}'");
        assert_eq!(
            one::<String>(&format!(
                "SELECT allowed_cidrs::text FROM apikeys.get_api_key('{id}')"
            ))
            .as_deref(),
            Some("{10.0.0.0/8}")
        );
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', allowed_cidrs => '{{192.168.0.0/16, ::1/128}}')"
        ));
        assert_eq!(code(&key, &at("10.0.0.1")), "FORBIDDEN");
        assert_eq!(code(&key, &at("192.168.3.4")), "VALID");
        assert_eq!(code(&key, &at("::1")), "VALID");
        // An empty list is no list.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', allowed_cidrs => '{{}}')"
        ));
        assert_eq!(
            one::<bool>(&format!(
                "SELECT allowed_cidrs IS NULL FROM apikeys.get_api_key('{id}')"
            )),
            Some(true)
        );
        assert_eq!(code(&key, ""), "VALID");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', allowed_cidrs => '{{10.0.0.0/8}}')"
        ));
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['allowed_cidrs'])"
        ));
        assert_eq!(code(&key, &at("8.8.8.8")), "VALID");
        assert_error(
            "SELECT apikeys.create_api_key(allowed_cidrs => ARRAY['10.0.0.0/8', NULL]::cidr[])",
            "22023",
            "allowed_cidrs",
        );
        // PostgreSQL's cidr refuses host bits and garbage before we see them.
        assert_error(
            "SELECT apikeys.create_api_key(allowed_cidrs => '{10.0.0.1/8}')",
            "22P02",
            "cidr",
        );
        assert_error(
            &format!("SELECT apikeys.update_api_key('{id}', allowed_cidrs => '{{10.0.0.0/8}}', clear => ARRAY['allowed_cidrs'])"),
            "22023",
            "clear",
        );
    }
}
