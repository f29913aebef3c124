//! The bridge between SPDK's JSON and serde_json: RPC parameters (`spdk_json_val`
//! tokens) become a `serde_json::Value` that the RPC layer validates in plain Rust, and
//! replies, `dump_info_json` and `write_config_json` are serialised by serde_json and
//! written with `spdk_json_write_val_raw`.
//!
//! Invariants: a token array is walked only within the bounds its first token declares
//! (`len` of an OBJECT/ARRAY_BEGIN counts the tokens up to the matching END); every
//! string is copied out before the RPC handler returns. Objects with a repeated key are
//! rejected here, because serde_json would silently keep the last one.

use super::ffi::cstring;
use serde_json::{Map, Number, Value};
use spdk_sys as sys;

/// JSON-RPC "invalid params".
pub(super) const INVALID_PARAMS: i32 = sys::SPDK_JSONRPC_ERROR_INVALID_PARAMS;

/// One token, copied out of SPDK's parse buffer.
struct Tok {
    ty: u32,
    /// Tokens until the matching END (begin tokens only).
    len: usize,
    text: Vec<u8>,
}

/// Converts RPC parameters to a Value; `Ok(None)` when the request had no params.
///
/// # Safety
/// `p` must be null or the `params` pointer SPDK passed to the RPC handler now running.
pub(super) unsafe fn params(p: *const sys::spdk_json_val) -> Result<Option<Value>, String> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: SPDK guarantees `p` points at the first token of a well-formed token array;
    // a begin token's `len` is the number of tokens up to (excluding) its END token.
    let toks: Vec<Tok> = unsafe {
        let first = &*p;
        let n = match first.type_ {
            sys::SPDK_JSON_VAL_OBJECT_BEGIN | sys::SPDK_JSON_VAL_ARRAY_BEGIN => {
                first.len as usize + 2
            }
            _ => 1,
        };
        std::slice::from_raw_parts(p, n)
            .iter()
            .map(|t| Tok {
                ty: t.type_,
                len: t.len as usize,
                text: match t.type_ {
                    sys::SPDK_JSON_VAL_STRING
                    | sys::SPDK_JSON_VAL_NAME
                    | sys::SPDK_JSON_VAL_NUMBER
                        if !t.start.is_null() =>
                    {
                        std::slice::from_raw_parts(t.start.cast::<u8>(), t.len as usize).to_vec()
                    }
                    _ => Vec::new(),
                },
            })
            .collect()
    };
    let mut i = 0;
    parse(&toks, &mut i).map(Some)
}

fn text(t: &Tok) -> Result<String, String> {
    String::from_utf8(t.text.clone()).map_err(|_| "invalid UTF-8 in a JSON string".to_string())
}

fn parse(t: &[Tok], i: &mut usize) -> Result<Value, String> {
    let tok = t.get(*i).ok_or("truncated JSON")?;
    *i += 1;
    match tok.ty {
        sys::SPDK_JSON_VAL_NULL => Ok(Value::Null),
        sys::SPDK_JSON_VAL_TRUE => Ok(Value::Bool(true)),
        sys::SPDK_JSON_VAL_FALSE => Ok(Value::Bool(false)),
        sys::SPDK_JSON_VAL_STRING => Ok(Value::String(text(tok)?)),
        sys::SPDK_JSON_VAL_NUMBER => number(&text(tok)?).map(Value::Number),
        sys::SPDK_JSON_VAL_ARRAY_BEGIN => {
            let end = *i + tok.len;
            let mut a = Vec::new();
            while *i < end {
                a.push(parse(t, i)?);
            }
            *i += 1; // ARRAY_END
            Ok(Value::Array(a))
        }
        sys::SPDK_JSON_VAL_OBJECT_BEGIN => {
            let end = *i + tok.len;
            let mut m = Map::new();
            while *i < end {
                let name = t.get(*i).ok_or("truncated JSON object")?;
                if name.ty != sys::SPDK_JSON_VAL_NAME {
                    return Err("malformed JSON object".into());
                }
                let key = text(name)?;
                *i += 1;
                let v = parse(t, i)?;
                if m.insert(key.clone(), v).is_some() {
                    return Err(format!("parameter '{key}' given more than once"));
                }
            }
            *i += 1; // OBJECT_END
            Ok(Value::Object(m))
        }
        _ => Err("malformed JSON".into()),
    }
}

fn number(s: &str) -> Result<Number, String> {
    if let Ok(u) = s.parse::<u64>() {
        return Ok(u.into());
    }
    if let Ok(i) = s.parse::<i64>() {
        return Ok(i.into());
    }
    s.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .ok_or_else(|| format!("invalid number {s}"))
}

/// Writes `v` as the next value of `w` (after a name inside an object, or as an array
/// element).
///
/// # Safety
/// `w` must be a live write context SPDK handed us for the current callback.
pub(super) unsafe fn write(w: *mut sys::spdk_json_write_ctx, v: &Value) {
    let s = v.to_string();
    // SAFETY: `w` is live (caller); the bytes are valid JSON of the given length, which
    // spdk_json_write_val_raw copies after emitting the separator the position needs.
    unsafe { sys::spdk_json_write_val_raw(w, s.as_ptr().cast(), s.len()) };
}

/// Writes `"name": v` into the object `w` is inside.
///
/// # Safety
/// As for `write`; `w` must be positioned inside an object.
pub(super) unsafe fn write_named(w: *mut sys::spdk_json_write_ctx, name: &str, v: &Value) {
    let n = cstring(name);
    // SAFETY: `w` live and inside an object (caller); `n` is NUL-terminated.
    unsafe {
        sys::spdk_json_write_name(w, n.as_ptr());
        write(w, v);
    }
}

/// A JSON-RPC request kept until the answer is known (possibly after asynchronous work).
/// It must be answered exactly once, on the app thread; `reply*` consume it.
pub(super) struct Request(*mut sys::spdk_jsonrpc_request);

// SAFETY: the pointer is only ever used on the app thread (RPC handlers and every
// callback that answers run there); Send only lets it sit in the app-thread-only
// registry behind a Mutex.
unsafe impl Send for Request {}

impl Request {
    /// # Safety
    /// `p` must be the request passed to the running RPC handler, answered only through
    /// the returned value.
    pub(super) unsafe fn new(p: *mut sys::spdk_jsonrpc_request) -> Request {
        Request(p)
    }

    pub(super) fn reply(self, v: &Value) {
        // SAFETY: the request is unanswered (we own it); begin_result returns the writer
        // for its result (null if the client went away, in which case we must not write).
        unsafe {
            let w = sys::spdk_jsonrpc_begin_result(self.0);
            if !w.is_null() {
                write(w, v);
                sys::spdk_jsonrpc_end_result(self.0, w);
            }
        }
    }

    pub(super) fn error(self, code: i32, msg: &str) {
        let m = cstring(msg);
        // SAFETY: the request is unanswered (we own it); `m` is NUL-terminated and copied.
        unsafe { sys::spdk_jsonrpc_send_error_response(self.0, code, m.as_ptr()) };
    }
}
