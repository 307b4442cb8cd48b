//! Route templates: raw paths with their identifiers collapsed, so that `/users/123` and
//! `/users/456` are one series (`/users/{id}`) and label cardinality stays bounded.

/// Longest route kept; longer ones are cut (and end with `…`).
const MAX_ROUTE_LEN: usize = 128;
/// Most path segments kept.
const MAX_SEGMENTS: usize = 12;

/// Whether a path segment is an identifier rather than a name: all digits, a UUID, a long hex
/// string (hashes, object ids), or a long mixed token of letters and digits.
fn is_id(seg: &str) -> bool {
    let b = seg.as_bytes();
    if b.is_empty() {
        return false;
    }
    // One pass (this runs for every segment of every request whose path is not cached): every
    // kind of id below is made of token bytes, so the first other byte settles it.
    let (mut digits, mut hex) = (0, true);
    for &c in b {
        if c.is_ascii_digit() {
            digits += 1;
        } else if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'=' | b'~') {
            hex &= c.is_ascii_hexdigit();
        } else {
            return false;
        }
    }
    digits == b.len()
        || is_uuid(b)
        || (hex && b.len() >= 8 && digits > 0)
        // Opaque tokens (base64url ids, slugs with numbers) are long and mix digits in.
        || (b.len() >= 20 && digits >= 2)
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The route template of a request path (query already stripped).
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_ROUTE_LEN));
    template_into(path, &mut out);
    out
}

/// [`template`] into a buffer the caller keeps, so that the hot path allocates nothing.
pub fn template_into(path: &str, out: &mut String) {
    out.clear();
    if path == "*" {
        out.push('*');
        return;
    }
    if !path.starts_with('/') {
        // Absolute-form targets (proxies): keep only the path part.
        if let Some(rest) = path.split_once("://").map(|(_, r)| r) {
            return template_into(rest.find('/').map_or("/", |i| &rest[i..]), out);
        }
        out.push_str("[invalid]");
        return;
    }
    for (i, seg) in path.split('/').skip(1).enumerate() {
        if i == MAX_SEGMENTS {
            out.push_str("/…");
            break;
        }
        out.push('/');
        if is_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
        if out.len() > MAX_ROUTE_LEN {
            let mut cut = MAX_ROUTE_LEN;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::template;

    #[test]
    fn collapses_ids() {
        assert_eq!(template("/"), "/");
        assert_eq!(template("/users/123"), "/users/{id}");
        assert_eq!(template("/users/123/orders/9"), "/users/{id}/orders/{id}");
        assert_eq!(
            template("/o/550e8400-e29b-41d4-a716-446655440000"),
            "/o/{id}"
        );
        assert_eq!(template("/blob/5f2b9c0e1d"), "/blob/{id}");
        assert_eq!(template("/api/v1/health"), "/api/v1/health");
        assert_eq!(template("/static/app.js"), "/static/app.js");
        assert_eq!(template("/feed/deadbeef"), "/feed/deadbeef");
        assert_eq!(template("http://h:80/a/12"), "/a/{id}");
        assert_eq!(template("*"), "*");
        assert_eq!(template("nonsense"), "[invalid]");
        assert_eq!(template("/t/aZ3_k9-Qx7pLm2Vb8Nc4"), "/t/{id}");
        assert_eq!(
            template("/t/a-long-slug-without-digits"),
            "/t/a-long-slug-without-digits"
        );
        assert_eq!(
            template("/t/has space 1234567890123"),
            "/t/has space 1234567890123"
        );
        assert_eq!(template("/v/1.2.3"), "/v/1.2.3");
        assert!(template(&"/a".repeat(200)).chars().count() <= 130);
    }
}
