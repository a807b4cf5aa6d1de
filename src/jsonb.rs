//! jsonb as the extension carries it: the bytes of one detoasted jsonb varlena, owned by Rust
//! (never a Datum pointing into memory that PostgreSQL may free), copied into the current
//! memory context only when handed back, and parsed only where its content is needed.
//!
//! Why not pgrx's `JsonB` for arguments and stored values: it parses on the way in and panics
//! (SQLSTATE XX000) on jsonb that PostgreSQL accepts but serde_json does not (numbers outside
//! f64 such as `1e400`, nesting deeper than 128 levels). Here a value that is only stored and
//! returned (metadata) passes through as given, and an argument that must be read fails with
//! 22023 naming the argument. The jsonb→serde→jsonb round trip also cost a tenth of a plain
//! verification (perf).

use crate::errors;
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable,
};
use pgrx::prelude::*;
use serde_json::Value;
use std::rc::Rc;

/// A jsonb value's bytes (a varlena with a 4-byte header).
#[derive(Clone, Debug)]
pub struct Jsonb(Rc<[u8]>);

impl Jsonb {
    /// A copy of a jsonb datum.
    ///
    /// # Safety
    /// `datum` must be a non-NULL jsonb datum, valid for the duration of the call.
    pub unsafe fn copy_of(datum: pg_sys::Datum) -> Jsonb {
        // SAFETY: the caller vouches for the datum; pg_detoast_datum returns it or a palloc'd
        // plain copy, whose varsize_any bytes are read before that copy is freed.
        unsafe {
            let varlena = datum.cast_mut_ptr::<pg_sys::varlena>();
            let plain = pg_sys::pg_detoast_datum(varlena);
            let len = pgrx::varlena::varsize_any(plain);
            let bytes: Rc<[u8]> = std::slice::from_raw_parts(plain.cast::<u8>(), len).into();
            if plain != varlena {
                pg_sys::pfree(plain.cast());
            }
            Jsonb(bytes)
        }
    }

    /// The jsonb of a serde value (serde → text → jsonb_in).
    pub fn encode(value: &Value) -> Jsonb {
        let datum = pgrx::JsonB(value.clone())
            .into_datum()
            .unwrap_or_else(|| errors::internal_error("jsonb_in returned NULL"));
        // SAFETY: jsonb_in just returned this datum in the current memory context.
        unsafe { Jsonb::copy_of(datum) }
    }

    /// A copy in the current memory context, to return or pass to PostgreSQL.
    pub fn datum(&self) -> pg_sys::Datum {
        // SAFETY: palloc either returns len writable bytes or raises; the bytes are a whole
        // varlena, so the copy is one too.
        unsafe {
            let copy = pg_sys::palloc(self.0.len()).cast::<u8>();
            std::ptr::copy_nonoverlapping(self.0.as_ptr(), copy, self.0.len());
            pg_sys::Datum::from(copy)
        }
    }

    /// Whether both hold the same jsonb bytes (jsonb's binary form is canonical: equal
    /// documents have equal bytes).
    pub fn same_bytes(&self, other: &Jsonb) -> bool {
        self.0 == other.0
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The value, or why serde_json cannot hold it (a number outside f64, nesting deeper than
    /// 128 levels).
    pub fn parse(&self) -> Result<Value, String> {
        let datum = self.datum();
        // SAFETY: jsonb_out reads a valid jsonb datum and returns a palloc'd C string, copied
        // out before it is freed.
        let text = unsafe {
            let cstr =
                pgrx::direct_function_call::<&std::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)])
                    .unwrap_or_else(|| errors::internal_error("jsonb_out returned NULL"));
            let text = cstr.to_string_lossy().into_owned();
            pg_sys::pfree(cstr.as_ptr().cast_mut().cast());
            pg_sys::pfree(datum.cast_mut_ptr());
            text
        };
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    /// The value, or JSON null when serde_json cannot hold it: for values the extension wrote
    /// itself (claims, permissions), which always can.
    pub fn value(&self) -> Value {
        self.parse().unwrap_or(Value::Null)
    }
}

/// A scalar of an object `Jsonb::array_of_objects` builds.
pub enum Scalar<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Null,
}

impl Jsonb {
    /// An array of flat objects, built with PostgreSQL's JsonbValue API: no JSON text is written
    /// and lexed again (jsonb_in was a tenth of a verification that reports its limits; perf).
    pub fn array_of_objects(objects: &[Vec<(&str, Scalar<'_>)>]) -> Jsonb {
        use pg_sys::JsonbIteratorToken::*;
        fn string(s: &str) -> pg_sys::JsonbValue {
            pg_sys::JsonbValue {
                type_: pg_sys::jbvType::jbvString,
                val: pg_sys::JsonbValue__bindgen_ty_1 {
                    string: pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                        len: i32::try_from(s.len()).unwrap_or(i32::MAX),
                        // An empty string's Rust pointer is dangling: give a real one.
                        val: if s.is_empty() {
                            c"".as_ptr()
                        } else {
                            s.as_ptr().cast()
                        }
                        .cast_mut(),
                    },
                },
            }
        }
        // Every JsonbValue pushed points at strings that outlive the build (`objects`, borrowed
        // for the call) or at palloc'd numerics; pushJsonbValue copies the values into its parse
        // state, JsonbValueToJsonb serializes them into a palloc'd varlena that copy_of copies
        // out. Errors (out of memory) are raised as PostgreSQL errors.
        // SAFETY: the pointers pushed outlive the build (above); nothing is freed before copy_of.
        unsafe {
            let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
            pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_ARRAY, std::ptr::null_mut());
            for object in objects {
                pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
                for (key, value) in object {
                    let mut k = string(key);
                    pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut k);
                    let mut v = match value {
                        Scalar::Str(s) => string(s),
                        Scalar::Int(n) => pg_sys::JsonbValue {
                            type_: pg_sys::jbvType::jbvNumeric,
                            val: pg_sys::JsonbValue__bindgen_ty_1 {
                                numeric: pg_sys::int64_to_numeric(*n),
                            },
                        },
                        Scalar::Bool(b) => pg_sys::JsonbValue {
                            type_: pg_sys::jbvType::jbvBool,
                            val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: *b },
                        },
                        Scalar::Null => pg_sys::JsonbValue {
                            type_: pg_sys::jbvType::jbvNull,
                            val: pg_sys::JsonbValue__bindgen_ty_1 { boolean: false },
                        },
                    };
                    pg_sys::pushJsonbValue(&mut state, WJB_VALUE, &mut v);
                }
                pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
            }
            let root = pg_sys::pushJsonbValue(&mut state, WJB_END_ARRAY, std::ptr::null_mut());
            let built = pg_sys::JsonbValueToJsonb(root);
            let copy = Jsonb::copy_of(pg_sys::Datum::from(built));
            pg_sys::pfree(built.cast());
            copy
        }
    }
}

/// The value of a jsonb argument that must be read; 22023 naming it when it cannot be.
pub fn argument(name: &str, value: Option<Jsonb>) -> Option<Value> {
    value.map(|v| {
        v.parse().unwrap_or_else(|problem| {
            errors::invalid_argument(
                name,
                format!("must be JSON with numbers that fit a double and at most 128 levels of nesting ({problem})"),
            )
        })
    })
}

impl FromDatum for Jsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Jsonb> {
        // SAFETY: a non-NULL datum of type jsonb, as FromDatum's contract says.
        (!is_null).then(|| unsafe { Jsonb::copy_of(datum) })
    }
}

impl IntoDatum for Jsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.datum())
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: the SQL type is jsonb, which is what FromDatum and IntoDatum read and write.
unsafe impl SqlTranslatable for Jsonb {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(Jsonb);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

// SAFETY: the argument is unboxed through FromDatum, which copies the value out.
unsafe impl<'fcx> ArgAbi<'fcx> for Jsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: pgrx calls this with a jsonb argument of the function being called.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| errors::internal_error(format!("argument {index} is NULL")))
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}
