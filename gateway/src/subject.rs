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

/// Whether the subjects `template` makes fall under one of `patterns`: each `{…}` is tried as
/// one token and as two (a change's entity is `schema.table`), in every combination.
pub fn template_captured(template: &str, patterns: &[String]) -> bool {
    // The literal text around the placeholders: n placeholders leave n + 1 pieces.
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some((before, after)) =
        rest.split_once('{').and_then(|(before, after)| after.split_once('}').map(|(_, after)| (before, after)))
    {
        pieces.push(before);
        rest = after;
    }
    pieces.push(rest);
    let placeholders = (pieces.len() - 1).min(8);
    (0..1u32 << placeholders).any(|widths| {
        let mut subject = String::with_capacity(template.len());
        for (index, piece) in pieces.iter().enumerate() {
            if index > 0 {
                subject.push_str(if widths >> (index - 1) & 1 == 1 { "x.x" } else { "x" });
            }
            subject.push_str(piece);
        }
        patterns.iter().any(|pattern| pattern_matches(pattern, &subject))
    })
}

/// Turns arbitrary text into one safe subject token: characters other than ASCII letters,
/// digits, `-` and `_` become `_`; empty text becomes `_`.
pub fn token(text: &str) -> String {
    let token: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if token.is_empty() { "_".to_string() } else { token }
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
    fn templates_are_tried_with_one_and_two_token_values() {
        let patterns = ["weir.*.*.*".to_string(), "shop.>".to_string()];
        assert!(template_captured("weir.{entity}.{op}", &patterns));
        assert!(template_captured("shop.{data.region}.{op}", &patterns));
        assert!(!template_captured("weir.dlq.{entity}", &["weir.public.>".to_string()]));
        assert!(!template_captured("audit.{entity}", &patterns));
    }

    #[test]
    fn tokens_from_data_cannot_inject() {
        assert_eq!(token("eu-west.1 *>"), "eu-west_1___");
        assert_eq!(token(""), "_");
        assert_eq!(token("ok_Token-9"), "ok_Token-9");
    }
}
