//! Text from outside (a certificate's subject, a token's name, an action's
//! error code) on its way into a log line: control characters escaped, so
//! it cannot end the line and forge the next one. Owns no policy about what
//! is logged.
//!
//! Also an error with its whole source chain on one line, for operators.

use std::borrow::Cow;

/// `s` with every control character (newlines, carriage returns, escape
/// sequences) written as Rust escapes, unchanged when it has none.
pub fn one_line(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// The whole source chain of an error on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(one_line("CN=a, O=b"), "CN=a, O=b");
        assert_eq!(one_line("a\nb\r\x1b[2J"), "a\\nb\\r\\u{1b}[2J");
        assert!(matches!(one_line("plain"), Cow::Borrowed(_)));
    }
}
