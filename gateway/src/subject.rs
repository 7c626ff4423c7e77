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
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::Whitespace(subject.to_string()));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken(subject.to_string()));
        }
        if token.contains('*') || token.contains('>') {
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

/// `template` with every placeholder token made `x`: a subject it can produce.
pub fn template_sample(template: &str) -> String {
    template.split('.').map(|token| if token.contains('{') { "x" } else { token }).collect::<Vec<_>>().join(".")
}

/// Turns arbitrary text into one safe subject token: characters other than ASCII letters,
/// digits, `-` and `_` become `_`; empty text becomes `_`.
pub fn token(text: &str) -> String {
    let mut token = String::with_capacity(text.len().max(1));
    push_token(&mut token, text);
    token
}

/// [`token`], appended to `subject` (no string of its own per token).
pub fn push_token(subject: &mut String, text: &str) {
    if text.is_empty() {
        subject.push('_');
    }
    subject.extend(text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }));
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
}
