//! The wire shape of every served request, checked before the codecs see
//! the bytes: each declared length (string, bytes, array count) must fit
//! in what is left of the frame.
//!
//! Why: the `kafka-protocol` codecs reserve an array's declared length
//! before reading its first element (`Vec::with_capacity(n)`), so a frame
//! of a few bytes declaring four billion elements makes that allocation
//! fail, and a failed allocation aborts the process (no `catch_unwind`
//! stops it). Every element takes at least one byte, so a count larger
//! than the bytes left is a lie; refusing it here bounds what the codecs
//! reserve by the frame size ([`super::connection::MAX_REQUEST_BYTES`]).
//!
//! The shapes are Kafka's request schemas, reduced to what positions the
//! next field: a field's type and the versions it is in. Flexible versions
//! use compact lengths and end every struct with tagged fields. The unit
//! test encodes a populated request of every served API and version with
//! the codecs and checks that its shape walks it to the last byte.

use bytes::Buf;
use kafka_protocol::messages::ApiKey;

/// A field's type, as far as its length on the wire goes.
#[derive(Clone, Copy)]
enum Kind {
    Fixed(usize),
    /// string or nullable string: int16 length, compact: varint length + 1.
    Text,
    /// bytes, nullable bytes or records: int32 length, compact: varint + 1.
    Data,
    Int32s,
    Texts,
    Structs(&'static [Field]),
}

const I8: Kind = Kind::Fixed(1);
const BOOL: Kind = Kind::Fixed(1);
const I16: Kind = Kind::Fixed(2);
const I32: Kind = Kind::Fixed(4);
const I64: Kind = Kind::Fixed(8);

#[derive(Clone, Copy)]
struct Field {
    kind: Kind,
    since: i16,
    until: i16,
}

// Struct literals, not `const fn` calls, so that nested `&[…]` are
// promoted to `'static`.
/// A field in every version.
macro_rules! always {
    ($kind:expr) => {
        Field {
            kind: $kind,
            since: 0,
            until: i16::MAX,
        }
    };
}

/// A field from version `since` on.
macro_rules! since {
    ($since:expr, $kind:expr) => {
        Field {
            kind: $kind,
            since: $since,
            until: i16::MAX,
        }
    };
}

/// A field up to version `until`.
macro_rules! until {
    ($until:expr, $kind:expr) => {
        Field {
            kind: $kind,
            since: 0,
            until: $until,
        }
    };
}

/// A field from `since` to `until`.
macro_rules! between {
    ($since:expr, $until:expr, $kind:expr) => {
        Field {
            kind: $kind,
            since: $since,
            until: $until,
        }
    };
}

/// A request body: its fields and its first flexible version.
struct Shape {
    flexible_since: i16,
    fields: &'static [Field],
}

fn shape(key: ApiKey) -> Option<Shape> {
    use Kind::*;
    let (flexible_since, fields): (i16, &'static [Field]) = match key {
        ApiKey::ApiVersions => (3, &[since!(3, Text), since!(3, Text)]),
        ApiKey::Metadata => (
            9,
            &[
                always!(Structs(&[since!(10, Fixed(16)), always!(Text)])),
                since!(4, BOOL),
                between!(8, 10, BOOL),
                since!(8, BOOL),
            ],
        ),
        ApiKey::ListOffsets => (
            6,
            &[
                always!(I32),
                since!(2, I8),
                always!(Structs(&[
                    always!(Text),
                    always!(Structs(&[
                        always!(I32),
                        since!(4, I32),
                        always!(I64),
                        until!(0, I32),
                    ])),
                ])),
                since!(10, I32),
            ],
        ),
        ApiKey::Fetch => (
            12,
            &[
                until!(14, I32),
                always!(I32),
                always!(I32),
                since!(3, I32),
                since!(4, I8),
                since!(7, I32),
                since!(7, I32),
                always!(Structs(&[
                    until!(12, Text),
                    since!(13, Fixed(16)),
                    always!(Structs(&[
                        always!(I32),
                        since!(9, I32),
                        always!(I64),
                        since!(12, I32),
                        since!(5, I64),
                        always!(I32),
                    ])),
                ])),
                since!(
                    7,
                    Structs(&[until!(12, Text), since!(13, Fixed(16)), always!(Int32s)])
                ),
                since!(11, Text),
            ],
        ),
        ApiKey::Produce => (
            9,
            &[
                since!(3, Text),
                always!(I16),
                always!(I32),
                always!(Structs(&[
                    until!(12, Text),
                    since!(13, Fixed(16)),
                    always!(Structs(&[always!(I32), always!(Data)])),
                ])),
            ],
        ),
        ApiKey::FindCoordinator => (3, &[until!(3, Text), since!(1, I8), since!(4, Texts)]),
        ApiKey::JoinGroup => (
            6,
            &[
                always!(Text),
                always!(I32),
                since!(1, I32),
                always!(Text),
                since!(5, Text),
                always!(Text),
                always!(Structs(&[always!(Text), always!(Data)])),
                since!(8, Text),
            ],
        ),
        ApiKey::SyncGroup => (
            4,
            &[
                always!(Text),
                always!(I32),
                always!(Text),
                since!(3, Text),
                since!(5, Text),
                since!(5, Text),
                always!(Structs(&[always!(Text), always!(Data)])),
            ],
        ),
        ApiKey::Heartbeat => (
            4,
            &[always!(Text), always!(I32), always!(Text), since!(3, Text)],
        ),
        ApiKey::LeaveGroup => (
            4,
            &[
                always!(Text),
                until!(2, Text),
                since!(3, Structs(&[always!(Text), always!(Text), since!(5, Text)])),
            ],
        ),
        ApiKey::OffsetCommit => (
            8,
            &[
                always!(Text),
                since!(1, I32),
                since!(1, Text),
                since!(7, Text),
                between!(2, 4, I64),
                always!(Structs(&[
                    always!(Text),
                    always!(Structs(&[
                        always!(I32),
                        always!(I64),
                        since!(6, I32),
                        always!(Text),
                    ])),
                ])),
            ],
        ),
        ApiKey::OffsetFetch => (
            6,
            &[
                until!(7, Text),
                until!(7, Structs(&[always!(Text), always!(Int32s)])),
                since!(
                    8,
                    Structs(&[
                        always!(Text),
                        since!(9, Text),
                        since!(9, I32),
                        always!(Structs(&[always!(Text), always!(Int32s)])),
                    ])
                ),
                since!(7, BOOL),
            ],
        ),
        ApiKey::DescribeGroups => (5, &[always!(Texts), since!(3, BOOL)]),
        ApiKey::SaslHandshake => (i16::MAX, &[always!(Text)]),
        ApiKey::SaslAuthenticate => (2, &[always!(Data)]),
        ApiKey::ListGroups => (3, &[since!(4, Texts), since!(5, Texts)]),
        _ => return None,
    };
    Some(Shape {
        flexible_since,
        fields,
    })
}

/// Checks that `body` (a request body after its header) of `key` at
/// `version` declares no length beyond its own bytes. Trailing bytes are
/// left to the codecs.
pub(super) fn check(key: ApiKey, version: i16, mut body: &[u8]) -> Result<(), String> {
    let Some(shape) = shape(key) else {
        return Err(format!("{key:?} has no known shape"));
    };
    let walk = Walk {
        version,
        flexible: version >= shape.flexible_since,
    };
    walk.fields(&mut body, shape.fields).map_err(|what| {
        format!(
            "{what} is longer than the {} bytes left of the frame",
            body.len()
        )
    })
}

struct Walk {
    version: i16,
    flexible: bool,
}

impl Walk {
    fn fields(&self, bytes: &mut &[u8], fields: &[Field]) -> Result<(), &'static str> {
        for field in fields {
            if (field.since..=field.until).contains(&self.version) {
                self.field(bytes, field.kind)?;
            }
        }
        if self.flexible {
            tagged_fields(bytes)?;
        }
        Ok(())
    }

    fn field(&self, bytes: &mut &[u8], kind: Kind) -> Result<(), &'static str> {
        match kind {
            Kind::Fixed(width) => skip(bytes, width, "a field"),
            Kind::Text => {
                let length = if self.flexible {
                    compact_length(bytes)?
                } else {
                    usize::try_from(take::<2>(bytes)?.as_slice().get_i16()).ok()
                };
                skip(bytes, length.unwrap_or(0), "a string")
            }
            Kind::Data => {
                let length = if self.flexible {
                    compact_length(bytes)?
                } else {
                    usize::try_from(take::<4>(bytes)?.as_slice().get_i32()).ok()
                };
                skip(bytes, length.unwrap_or(0), "a bytes field")
            }
            Kind::Int32s => {
                let count = self.count(bytes)?;
                skip(bytes, count.saturating_mul(4), "an int32 array")
            }
            Kind::Texts => {
                for _ in 0..self.count(bytes)? {
                    self.field(bytes, Kind::Text)?;
                }
                Ok(())
            }
            Kind::Structs(fields) => {
                for _ in 0..self.count(bytes)? {
                    self.fields(bytes, fields)?;
                }
                Ok(())
            }
        }
    }

    /// An array's element count (0 for null), at most the bytes left: every
    /// element takes at least one.
    fn count(&self, bytes: &mut &[u8]) -> Result<usize, &'static str> {
        let count = if self.flexible {
            compact_length(bytes)?
        } else {
            usize::try_from(take::<4>(bytes)?.as_slice().get_i32()).ok()
        }
        .unwrap_or(0);
        if count > bytes.len() {
            return Err("an array's declared count");
        }
        Ok(count)
    }
}

/// A compact length: varint length + 1, 0 for null.
fn compact_length(bytes: &mut &[u8]) -> Result<Option<usize>, &'static str> {
    Ok(usize::try_from(varint(bytes)?)
        .ok()
        .and_then(|n| n.checked_sub(1)))
}

/// Tagged fields: a count, then tag, size and that many bytes each.
fn tagged_fields(bytes: &mut &[u8]) -> Result<(), &'static str> {
    let count = varint(bytes)?;
    for _ in 0..count {
        varint(bytes)?;
        let size = usize::try_from(varint(bytes)?).map_err(|_| "a tagged field")?;
        skip(bytes, size, "a tagged field")?;
    }
    Ok(())
}

/// An unsigned varint of at most 5 bytes (a u32).
fn varint(bytes: &mut &[u8]) -> Result<u32, &'static str> {
    let mut value: u32 = 0;
    for shift in (0..35).step_by(7) {
        let [byte, rest @ ..] = *bytes else {
            return Err("a varint");
        };
        *bytes = rest;
        value |= u32::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint")
}

fn take<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], &'static str> {
    let Some((head, rest)) = bytes.split_first_chunk::<N>() else {
        return Err("a field");
    };
    *bytes = rest;
    Ok(*head)
}

fn skip(bytes: &mut &[u8], length: usize, what: &'static str) -> Result<(), &'static str> {
    if length > bytes.len() {
        return Err(what);
    }
    *bytes = &bytes[length..];
    Ok(())
}

#[cfg(test)]
#[path = "shape_tests.rs"]
mod tests;
