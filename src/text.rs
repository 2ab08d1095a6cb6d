//! Text from outside (a certificate's subject, a token's name, an action's
//! error code) on its way into a log line: control characters escaped, so
//! it cannot end the line and forge the next one. Owns no policy about what
//! is logged.

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
