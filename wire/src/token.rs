//! The NATS token rule: anything that becomes one token of a subject (a UID segment, a zone, a faction, a
//! participant, an adapter or feed name) is 1 to 64 of `[A-Za-z0-9_-]`. That excludes the subject separator
//! `.`, the wildcards `*` and `>`, whitespace and everything a subject could be confused by.

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 64;

/// Why a value is not a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Empty or longer than [`MAX_TOKEN_LEN`].
    Length,
    /// A character outside `[A-Za-z0-9_-]`.
    Char(char),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Length => write!(f, "must be 1 to {MAX_TOKEN_LEN} characters"),
            Self::Char(c) => write!(
                f,
                "character {c:?} is not allowed (letters, digits, '-', '_')"
            ),
        }
    }
}

impl std::error::Error for TokenError {}

/// Checks `value` against the token rule.
pub fn check_token(value: &str) -> Result<(), TokenError> {
    if value.is_empty() || value.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Length);
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(c) => Err(TokenError::Char(c)),
        None => Ok(()),
    }
}

/// Whether `value` is a token.
pub fn valid_token(value: &str) -> bool {
    check_token(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_digits_dash_and_underscore_are_a_token() {
        assert!(valid_token("harbour-3_B"));
        assert!(valid_token(&"x".repeat(MAX_TOKEN_LEN)));
    }

    #[test]
    fn separators_wildcards_whitespace_and_length_are_not() {
        for bad in ["", "a.b", "a*", ">", "a b", "tab\t", "é"] {
            assert!(!valid_token(bad), "{bad:?}");
        }
        assert_eq!(check_token("a.b"), Err(TokenError::Char('.')));
        assert_eq!(
            check_token(&"x".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::Length)
        );
    }
}
