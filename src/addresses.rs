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
        let text = unsafe {
            pgrx::direct_function_call::<&CStr>(pg_sys::cidr_out, &[Some(datum)])
        };
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
    let inet = unsafe {
        pgrx::direct_function_call::<pgrx::datum::Inet>(pg_sys::inet_client_addr, &[])
    };
    inet.and_then(|ip| network::parse_inet(&ip.0))
}
