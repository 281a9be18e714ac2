//! The console's static files, compiled into the binary: htmx and its
//! server-sent-events extension (vendored from npm, see
//! `assets/VENDORED.md`) and the stylesheet. Their names carry their
//! version, so they are cached for good.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

pub const HTMX: &str = "htmx-2.0.11.min.js";
pub const HTMX_SSE: &str = "htmx-ext-sse-2.2.4.min.js";
pub const CSS: &str = "console-1.css";

const FILES: [(&str, &str, &[u8]); 3] = [
    (
        HTMX,
        "text/javascript",
        include_bytes!("assets/htmx-2.0.11.min.js"),
    ),
    (
        HTMX_SSE,
        "text/javascript",
        include_bytes!("assets/htmx-ext-sse-2.2.4.min.js"),
    ),
    (CSS, "text/css", include_bytes!("assets/console.css")),
];

pub async fn asset(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
