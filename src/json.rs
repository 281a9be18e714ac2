//! Strict JSON for input from outside: an object that names a member twice
//! (`{"amount": 5, "amount": 6}`) is refused instead of resolved to the last
//! value, at any depth. Two parsers that disagree on which value wins (a
//! proxy that checks the first, a service that uses the last) are a classic
//! way to smuggle a value past a check.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a body is not strict JSON.
#[derive(Debug, thiserror::Error)]
pub enum StrictJsonError {
    /// An object names `0` twice.
    #[error("the member {0:?} appears twice in one object")]
    DuplicateMember(String),
    /// Not JSON at all.
    #[error("{0}")]
    Malformed(serde_json::Error),
}

/// Parses `bytes` as JSON, refusing duplicate members.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, StrictJsonError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue::deserialize(&mut deserializer)
        .and_then(|v| deserializer.end().map(|()| v.0))
        .map_err(|e| match duplicate_member(&e) {
            Some(name) => StrictJsonError::DuplicateMember(name),
            None => StrictJsonError::Malformed(e),
        })?;
    Ok(value)
}

/// The marker a duplicate's error message starts with.
const DUPLICATE: &str = "duplicate member ";

fn duplicate_member(error: &serde_json::Error) -> Option<String> {
    let message = error.to_string();
    let rest = message.strip_prefix(DUPLICATE)?;
    // serde_json appends " at line L column C".
    let end = rest.rfind(" at line ").unwrap_or(rest.len());
    serde_json::from_str(&rest[..end]).ok()
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if members.contains_key(&name) {
                let quoted = Value::String(name).to_string();
                return Err(de::Error::custom(format!("{DUPLICATE}{quoted}")));
            }
            let StrictValue(value) = map.next_value()?;
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_named_twice_is_refused_at_any_depth() {
        let refused = |body: &str| match parse_strict(body.as_bytes()) {
            Err(StrictJsonError::DuplicateMember(name)) => name,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(refused(r#"{"amount": 5, "amount": 6}"#), "amount");
        assert_eq!(refused(r#"{"a": [{"b\"c": 1, "b\"c": 2}]}"#), "b\"c");
        assert!(matches!(
            parse_strict(b"{\"a\": 1,}"),
            Err(StrictJsonError::Malformed(_))
        ));
        assert!(matches!(
            parse_strict(b"{} {}"),
            Err(StrictJsonError::Malformed(_))
        ));
        let value =
            parse_strict(br#"{"a": 1, "b": [1.5, null, true, "x"], "c": {"a": 2}}"#).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": 1, "b": [1.5, null, true, "x"], "c": {"a": 2}})
        );
    }
}
