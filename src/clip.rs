//! Bounded text for log lines and stored reasons: a value that comes from a
//! writer (a key, a topic name) or quotes one (a database error's failing
//! row) is cut to a fixed length, so one odd row cannot flood the logs.

use std::borrow::Cow;

/// Characters kept of a clipped value.
pub const CLIP_CHARS: usize = 120;

/// Characters kept of a clipped error (its causes included).
pub const CLIP_ERROR_CHARS: usize = 480;

/// `text` cut to [`CLIP_CHARS`] characters, saying how long it was.
pub fn clip(text: &str) -> Cow<'_, str> {
    clip_to(text, CLIP_CHARS)
}

/// An error with its causes (`{:#}`), cut to [`CLIP_ERROR_CHARS`].
pub fn clip_error(error: &(impl std::fmt::Display + ?Sized)) -> String {
    clip_to(&format!("{error:#}"), CLIP_ERROR_CHARS).into_owned()
}

/// Cut to `chars`; a NUL becomes U+FFFD, as Postgres stores no NUL in text
/// (a reason or an error quoting one would be refused).
fn clip_to(text: &str, chars: usize) -> Cow<'_, str> {
    let clipped = match text.char_indices().nth(chars) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len())),
    };
    if clipped.contains('\0') {
        Cow::Owned(clipped.replace('\0', "\u{fffd}"))
    } else {
        clipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_long_text_is_cut_on_a_char_boundary() {
        assert_eq!(clip("order-42"), "order-42");
        let long = "é".repeat(3000);
        let clipped = clip(&long);
        assert!(clipped.starts_with(&"é".repeat(CLIP_CHARS)));
        assert!(clipped.ends_with("… (6000 bytes)"), "{clipped}");
        let error = anyhow::anyhow!("{}", "x".repeat(10_000));
        assert!(clip_error(&error).chars().count() < CLIP_ERROR_CHARS + 20);
        assert_eq!(clip("a\0b"), "a\u{fffd}b");
    }
}
