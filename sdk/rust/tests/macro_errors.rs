//! The attribute macros explain a wrong signature at the offending tokens.

#[test]
fn wrong_signatures_get_readable_errors() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
