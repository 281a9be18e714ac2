//! A console request's session: who asks and what they may do (made by
//! [`super::auth`], read by every page).

/// What a session may do besides reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// Actions: resets, re-drives, discards, replays.
    pub write: bool,
    /// Record payloads and headers as written (else emails are masked).
    pub payloads: bool,
}

impl Permissions {
    pub const ALL: Permissions = Permissions {
        write: true,
        payloads: true,
    };

    pub(super) fn bits(self) -> u8 {
        u8::from(self.write) | (u8::from(self.payloads) << 1)
    }

    pub(super) fn from_bits(bits: u8) -> Permissions {
        Permissions {
            write: bits & 1 != 0,
            payloads: bits & 2 != 0,
        }
    }
}

/// A request's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub permissions: Permissions,
    /// The token its forms carry; None for a bearer token (a browser never
    /// sends one by itself, so there is nothing to forge).
    pub csrf: Option<String>,
}
