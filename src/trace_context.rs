//! W3C Trace Context (`traceparent`), carried from an order to its mail.
//!
//! `POST /orders` continues the caller's trace (or starts one) and stores
//! the order's `traceparent` in the outbox row's headers; the relay copies
//! headers into the log record; the mail worker continues the trace from the
//! record: its log lines carry the trace id and the mail a `Traceparent`
//! header. A writer in another language that puts `traceparent` into the
//! outbox row's `headers` gets the same.
//!
//! Spans are not exported (no OpenTelemetry SDK): the trace id links the
//! log lines of every hop, which is what `LOG_FORMAT=json` and a log search
//! need; an exporter can be added behind these ids later.

use std::fmt;

/// The header name, in the outbox row's headers and in HTTP.
pub const TRACEPARENT: &str = "traceparent";

/// One `traceparent`: a trace id, the id of the span it came from, and
/// whether the caller samples the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value (version `00`, or a later version's
    /// first four fields as the spec asks). `None` for anything invalid,
    /// including all-zero ids: the caller then starts a new trace.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let mut fields = value.split('-');
        let version = fields.next()?;
        let trace_id = fields.next()?;
        let parent_id = fields.next()?;
        let flags = fields.next()?;
        let rest = fields.next();
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
            return None;
        }
        if !lower_hex(trace_id, 32) || !lower_hex(parent_id, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let parsed = TraceParent {
            trace_id: u128::from_str_radix(trace_id, 16).ok()?,
            parent_id: u64::from_str_radix(parent_id, 16).ok()?,
            flags: u8::from_str_radix(flags, 16).ok()?,
        };
        (parsed.trace_id != 0 && parsed.parent_id != 0).then_some(parsed)
    }

    /// A new trace (sampled).
    pub fn new_root() -> TraceParent {
        TraceParent {
            trace_id: nonzero(rand::random()),
            parent_id: nonzero(rand::random()),
            flags: 1,
        }
    }

    /// A new span of the same trace, child of this one.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: nonzero(rand::random()),
            ..*self
        }
    }

    /// The id of the span this `traceparent` names, as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.parent_id)
    }

    /// The trace id as 32 lowercase hex digits (what log lines carry).
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The trace a record's headers carry, if any and valid.
    pub fn from_headers(headers: &serde_json::Value) -> Option<TraceParent> {
        headers.get(TRACEPARENT)?.as_str().and_then(Self::parse)
    }
}

fn nonzero<T: PartialEq + From<u8>>(id: T) -> T {
    if id == T::from(0) {
        T::from(1)
    } else {
        id
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specs_example_and_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.to_string(), text);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = parsed.child();
        assert_eq!(child.trace_id(), parsed.trace_id());
        assert_ne!(child, parsed);
        assert_eq!(TraceParent::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn refuses_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version: its first four fields are read.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn new_traces_are_valid_and_distinct() {
        let a = TraceParent::new_root();
        let b = TraceParent::new_root();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
        let headers = serde_json::json!({ "traceparent": a.to_string() });
        assert_eq!(TraceParent::from_headers(&headers), Some(a));
    }
}
