//! The web dashboard: static assets embedded in the binary (it works offline and ships as one
//! file), served next to the API they read.

use axum::{
    Router,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::api::AppState;

const INDEX: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");
/// Cytoscape.js, vendored at a pinned version (assets/vendor/README.md).
const CYTOSCAPE: &str = include_str!("../assets/vendor/cytoscape.min.js");
const CYTOSCAPE_LICENSE: &str = include_str!("../assets/vendor/LICENSE-cytoscape");

fn asset(body: &'static str, content_type: &'static str, cache: bool) -> Response {
    let mut resp = body.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The page itself is always fresh (it names the assets); the library never changes
    // within a build.
    let cache_control = if cache {
        "public, max-age=3600"
    } else {
        "no-cache"
    };
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    resp
}

/// Path, body, content type, and whether it may be cached.
const ASSETS: &[(&str, &str, &str, bool)] = &[
    ("/", INDEX, "text/html; charset=utf-8", false),
    (
        "/assets/app.js",
        APP_JS,
        "text/javascript; charset=utf-8",
        false,
    ),
    ("/assets/style.css", STYLE, "text/css; charset=utf-8", false),
    (
        "/assets/cytoscape.min.js",
        CYTOSCAPE,
        "text/javascript; charset=utf-8",
        true,
    ),
    (
        "/assets/LICENSE-cytoscape",
        CYTOSCAPE_LICENSE,
        "text/plain; charset=utf-8",
        true,
    ),
];

pub fn router() -> Router<AppState> {
    ASSETS.iter().fold(
        Router::new(),
        |router, &(path, body, content_type, cache)| {
            router.route(
                path,
                get(move || async move { asset(body, content_type, cache) }),
            )
        },
    )
}
