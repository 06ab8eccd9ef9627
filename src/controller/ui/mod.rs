//! The rollout page (`GET /ui/`): one HTML file, one script and one style sheet, written by
//! hand and compiled into the binary, so the page is exactly as old as the API it calls and
//! needs nothing from outside the controller. It is served on the operator API behind the
//! same checks (mutual TLS, operator certificates only); the browser then calls `/v1/...`
//! on the same origin. `uiproxy` lets a browser without the certificate reach it.

use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::net::Body;

pub const INDEX_HTML: &str = include_str!("index.html");
pub const APP_JS: &str = include_str!("app.js");
pub const APP_CSS: &str = include_str!("app.css");

/// Only the controller's own files and API: no inline script or style (the script sets
/// styles through the CSSOM, which this allows), no frame around the page, no form posts.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The asset at `/ui/<rest>` (`rest` empty for the page), for GET only.
pub fn respond(method: &Method, rest: &[&str]) -> Option<Response<Body>> {
    if method != Method::GET {
        return None;
    }
    let (body, content_type) = match rest {
        [] | [""] | ["index.html"] => (INDEX_HTML, "text/html; charset=utf-8"),
        ["app.js"] => (APP_JS, "text/javascript; charset=utf-8"),
        ["app.css"] => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = Response::new(crate::net::full(body));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A controller upgrade brings a new page with its new API: never a stale copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// Bytes of the page's three files (what a first load moves).
pub fn size() -> usize {
    INDEX_HTML.len() + APP_JS.len() + APP_CSS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_asset_has_its_type_and_the_policy() {
        for (rest, ty) in [
            (&[][..], "text/html"),
            (&["app.js"][..], "text/javascript"),
            (&["app.css"][..], "text/css"),
        ] {
            let r = respond(&Method::GET, rest).expect("served");
            let h = r.headers();
            assert!(h[header::CONTENT_TYPE].to_str().unwrap().starts_with(ty));
            assert!(h[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'"));
        }
        assert!(respond(&Method::GET, &["other.js"]).is_none());
        assert!(respond(&Method::POST, &[]).is_none());
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        // No CDN, no inline code: the policy would block it, so it must not be there.
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            // The SVG namespace is a name, not something fetched.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        assert!(INDEX_HTML.contains(r#"src="/ui/app.js""#));
        assert!(INDEX_HTML.contains(r#"href="/ui/app.css""#));
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("style="));
    }
}
