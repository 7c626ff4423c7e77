//! NATS subject rules: what a valid subject is, and turning data into safe subject tokens.

/// Why a subject is not one Weir will publish to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The subject is empty.
    #[error("subject is empty")]
    Empty,
    /// `a..b`, `.a` or `a.`.
    #[error("subject `{0}` has an empty token (two dots in a row, or a leading or trailing dot)")]
    EmptyToken(String),
    /// `*` or `>` would make it a wildcard.
    #[error("subject `{0}` contains a wildcard (`*` or `>`); publish subjects must be literal")]
    Wildcard(String),
    /// Spaces, tabs, newlines and other control characters break the NATS protocol.
    #[error("subject `{0}` contains whitespace or a control character")]
    Whitespace(String),
    /// Longer than NATS accepts comfortably.
    #[error("subject is {0} bytes long; the limit is {MAX_SUBJECT_LEN}")]
    TooLong(usize),
}

/// Longest subject Weir publishes to.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Checks that `subject` is a literal NATS subject: non-empty tokens, no wildcards, no whitespace.
pub fn validate(subject: &str) -> Result<(), SubjectError> {
    if subject.is_empty() {
        return Err(SubjectError::Empty);
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong(subject.len()));
    }
    // Byte by byte where the subject is ASCII (ASCII whitespace and controls are the bytes up to
    // the space, and DEL), by characters otherwise: subjects are checked on every publish.
    let bytes = subject.as_bytes();
    let spaced = if bytes.is_ascii() {
        bytes.iter().any(|&byte| byte <= b' ' || byte == 0x7f)
    } else {
        subject.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if spaced {
        return Err(SubjectError::Whitespace(subject.to_string()));
    }
    for token in bytes.split(|&byte| byte == b'.') {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken(subject.to_string()));
        }
        if token.iter().any(|&byte| byte == b'*' || byte == b'>') {
            return Err(SubjectError::Wildcard(subject.to_string()));
        }
    }
    Ok(())
}

/// Whether `subject` is one NATS keeps for itself: `$JS.API.…`, `$SYS.…` and the like run server
/// commands (a purge of the stream), and `_INBOX.…` answers another client's request (a forged
/// PubAck). A plugin may publish there only under an allowed prefix the route names explicitly.
pub fn reserved(subject: &str) -> bool {
    subject.starts_with('$') || subject == "_INBOX" || subject.starts_with("_INBOX.")
}

/// Whether NATS subject `pattern` (`*` one token, `>` one or more trailing tokens) matches the
/// literal `subject`.
pub fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for wanted in pattern.split('.') {
        match (wanted, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether some subject `template` can make falls under NATS subject `pattern`. A token with a
/// `{…}` placeholder can be any one token (values are made single tokens, see [`token`]).
pub fn template_overlaps(template: &str, pattern: &str) -> bool {
    let mut made = template.split('.');
    for wanted in pattern.split('.') {
        match (wanted, made.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (_, Some(token)) if token.contains('{') => {}
            (wanted, Some(token)) if wanted == token => {}
            _ => return false,
        }
    }
    made.next().is_none()
}

/// Whether some subject `template` can make starts with the literal tokens of `prefix` (a
/// `{…}` token can be any one).
pub fn template_can_start_with(template: &str, prefix: &str) -> bool {
    let mut made = template.split('.');
    prefix.split('.').all(|wanted| made.next().is_some_and(|token| token.contains('{') || token == wanted))
}

/// `template` with every placeholder token made `x`: a subject it can produce.
pub fn template_sample(template: &str) -> String {
    template.split('.').map(|token| if token.contains('{') { "x" } else { token }).collect::<Vec<_>>().join(".")
}

/// Longest token made from data, in characters. A longer value (a 5 KB key) keeps its first
/// [`LONG_TOKEN_KEEPS`] characters and gains a hash of the whole: a subject made of a few such
/// tokens stays far inside NATS's 4 KiB protocol line, past which the server drops the
/// connection, and two long values that share a beginning still get different subjects.
pub const MAX_TOKEN_CHARS: usize = 128;
/// What a shortened token keeps of its value, before `-` and 16 hex digits of its SHA-256.
pub const LONG_TOKEN_KEEPS: usize = 64;

/// Turns arbitrary text into one safe subject token: characters other than ASCII letters,
/// digits, `-` and `_` become `_`; empty text becomes `_`; text longer than
/// [`MAX_TOKEN_CHARS`] is shortened (see there).
pub fn token(text: &str) -> String {
    let mut token = String::with_capacity(text.len().clamp(1, MAX_TOKEN_CHARS));
    push_token(&mut token, text);
    token
}

/// [`token`], appended to `subject` (no string of its own per token).
pub fn push_token(subject: &mut String, text: &str) {
    if text.is_empty() {
        subject.push('_');
    }
    let safe = |c: char| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' };
    // The common case, a short ASCII token, byte by byte (a char is a byte there).
    if text.len() <= MAX_TOKEN_CHARS && text.is_ascii() {
        subject.reserve(text.len());
        subject.extend(text.bytes().map(|b| safe(char::from(b))));
        return;
    }
    // Counted only up to the limit: almost every value is short.
    if text.chars().nth(MAX_TOKEN_CHARS).is_none() {
        subject.extend(text.chars().map(safe));
        return;
    }
    use sha2::Digest;
    subject.extend(text.chars().take(LONG_TOKEN_KEEPS).map(safe));
    subject.push('-');
    for byte in &sha2::Sha256::digest(text.as_bytes())[..8] {
        subject.push_str(&format!("{byte:02x}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_subjects_pass() {
        assert_eq!(validate("weir.orders.insert"), Ok(()));
        assert_eq!(validate("a"), Ok(()));
    }

    #[test]
    fn bad_subjects_are_named() {
        assert_eq!(validate(""), Err(SubjectError::Empty));
        assert!(matches!(validate("a..b"), Err(SubjectError::EmptyToken(_))));
        assert!(matches!(validate(".a"), Err(SubjectError::EmptyToken(_))));
        assert!(matches!(validate("a."), Err(SubjectError::EmptyToken(_))));
        assert!(matches!(validate("a.*"), Err(SubjectError::Wildcard(_))));
        assert!(matches!(validate("a.>"), Err(SubjectError::Wildcard(_))));
        assert!(matches!(validate("a.b*c"), Err(SubjectError::Wildcard(_))));
        assert!(matches!(validate("a b"), Err(SubjectError::Whitespace(_))));
        assert!(matches!(validate("a\nb"), Err(SubjectError::Whitespace(_))));
        for spaced in ["a\tb", "a\u{7f}", "\u{1}a", "é.a\u{a0}b", "é.a\u{2028}", "é\u{85}"] {
            assert!(matches!(validate(spaced), Err(SubjectError::Whitespace(_))), "{spaced:?}");
        }
        assert_eq!(validate("weir.commandes.créée"), Ok(()));
        assert!(matches!(validate("é.*"), Err(SubjectError::Wildcard(_))));
        assert!(matches!(validate(&"a".repeat(2000)), Err(SubjectError::TooLong(2000))));
    }

    #[test]
    fn patterns_match_as_nats_does() {
        assert!(pattern_matches("weir.>", "weir.orders.insert"));
        assert!(pattern_matches("weir.*.insert", "weir.orders.insert"));
        assert!(pattern_matches("weir.orders.insert", "weir.orders.insert"));
        assert!(!pattern_matches("weir.>", "weir"));
        assert!(!pattern_matches("weir.*", "weir.orders.insert"));
        assert!(!pattern_matches("weir.*.insert", "weir.orders.delete"));
        assert!(!pattern_matches("weir.orders.insert.x", "weir.orders.insert"));
        assert!(!pattern_matches("other.>", "weir.orders"));
        assert!(pattern_matches(">", "weir"));
        assert!(pattern_matches("*.>", "weir.orders"));
        assert!(!pattern_matches("*.>", "weir"));
        assert!(!pattern_matches("weir", ""));
    }

    #[test]
    fn templates_overlap_patterns_token_by_token() {
        assert!(template_overlaps("weir.{entity}.{op}", "weir.>"));
        assert!(template_overlaps("shop.{entity}.{op}", "shop.orders.*"));
        assert!(template_overlaps("weir.{schema}.{table}.{op}", "weir.public.>"));
        assert!(!template_overlaps("weir.{entity}.{op}", "weir.*.*.*"));
        assert!(!template_overlaps("weir.dlq.{entity}", "weir.public.>"));
        assert!(!template_overlaps("audit.{entity}", "weir.>"));
        assert_eq!(template_sample("weir.dlq.{entity}"), "weir.dlq.x");
        assert!(template_can_start_with("shop.{entity}.{op}", "shop"));
        assert!(template_can_start_with("shop.{entity}.{op}", "shop.orders.insert"));
        assert!(template_can_start_with("{entity}.{op}", "audit"));
        assert!(!template_can_start_with("weir.{entity}.{op}", "shop"));
        assert!(!template_can_start_with("shop.{entity}", "shop.orders.insert"));
    }

    #[test]
    fn tokens_from_data_cannot_inject() {
        assert_eq!(token("eu-west.1 *>"), "eu-west_1___");
        assert_eq!(token(""), "_");
        assert_eq!(token("ok_Token-9"), "ok_Token-9");
        // One `_` per character, not per byte.
        assert_eq!(token("é.x"), "__x");
        let mut subject = String::from("weir.");
        push_token(&mut subject, "");
        push_token(&mut subject, "a b");
        assert_eq!(subject, "weir._a_b");
    }

    #[test]
    fn long_values_become_bounded_tokens_that_still_differ() {
        let at_limit = "k".repeat(MAX_TOKEN_CHARS);
        assert_eq!(token(&at_limit), at_limit, "a value at the limit is kept whole");
        let long = format!("{}{}", "k".repeat(5000), "a.b");
        let shortened = token(&long);
        assert_eq!(shortened.len(), LONG_TOKEN_KEEPS + 1 + 16);
        assert!(shortened.starts_with(&"k".repeat(LONG_TOKEN_KEEPS)));
        assert_eq!(validate(&format!("weir.{shortened}")), Ok(()));
        assert_ne!(token(&format!("{}{}", "k".repeat(5000), "a.c")), shortened, "the hash covers the whole value");
        assert_eq!(token(&long), shortened, "the same value always takes the same subject");
        // Multi-byte characters count once each.
        assert_eq!(token(&"é".repeat(MAX_TOKEN_CHARS)), "_".repeat(MAX_TOKEN_CHARS));
    }
}
