//! PostgreSQL values (text format, as pgoutput sends them) to JSON, by column type.
//!
//! Rows are written straight into a JSON byte buffer rather than through a `serde_json::Value`
//! tree: building verbose JSON per row was the main client-side cost in the prototype.

use super::pgoutput::{Column, Value};
use base64::Engine as _;
use std::collections::HashMap;

/// How a type's text form becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `t`/`f` → `true`/`false`.
    Bool,
    /// Integers → numbers.
    Integer,
    /// Floats → numbers; `NaN` and `±Infinity` → strings.
    Float,
    /// `numeric` → a string, so no precision is lost.
    Numeric,
    /// `json`/`jsonb` → embedded as JSON.
    Json,
    /// `timestamptz` → RFC 3339 (`±infinity` as strings).
    TimestampTz,
    /// `timestamp` → `YYYY-MM-DDTHH:MM:SS[.ffffff]`, no offset (`±infinity` as strings).
    Timestamp,
    /// `bytea` → base64.
    Bytea,
    /// An array of the element type with this OID.
    Array(u32),
    /// Anything else (text, date, time, uuid, enums, …) → its text form as a string.
    Text,
}

/// What the gateway knows of `pg_type`: each OID's kind.
#[derive(Debug, Default, Clone)]
pub struct Types {
    kinds: HashMap<u32, Kind>,
    /// Array element separators other than `,` (`box` uses `;`), by element type.
    delimiters: HashMap<u32, char>,
}

impl Types {
    /// Builds the table from `pg_type` rows: `(oid, typname, typtype, typelem, typcategory,
    /// typbasetype)`. Domains take their base type's kind.
    pub fn from_rows(rows: &[(u32, String, i8, u32, i8, u32)]) -> Types {
        let mut kinds = HashMap::with_capacity(rows.len());
        let mut domains = Vec::new();
        for (oid, name, typtype, element, category, base) in rows {
            if *typtype == b'd' as i8 {
                domains.push((*oid, *base));
                continue;
            }
            let kind = match name.as_str() {
                "bool" => Kind::Bool,
                "int2" | "int4" | "int8" | "oid" | "xid" | "cid" => Kind::Integer,
                "float4" | "float8" => Kind::Float,
                "numeric" => Kind::Numeric,
                "json" | "jsonb" => Kind::Json,
                "timestamptz" => Kind::TimestampTz,
                "timestamp" => Kind::Timestamp,
                "bytea" => Kind::Bytea,
                _ if *category == b'A' as i8 && *element != 0 => Kind::Array(*element),
                _ => Kind::Text,
            };
            kinds.insert(*oid, kind);
        }
        // A domain over a domain takes the kind at the end of the chain, whatever order the rows
        // came in (bounded: a chain is short, and a cycle must not hang the gateway).
        let domain_bases: HashMap<u32, u32> = domains.iter().copied().collect();
        for (oid, mut base) in domains {
            for _ in 0..32 {
                match domain_bases.get(&base) {
                    Some(&next) => base = next,
                    None => break,
                }
            }
            let kind = kinds.get(&base).copied().unwrap_or(Kind::Text);
            kinds.insert(oid, kind);
        }
        Types { kinds, delimiters: HashMap::new() }
    }

    /// Records that arrays of `element` separate their items with `delimiter` (`pg_type.typdelim`).
    pub fn set_delimiter(&mut self, element: u32, delimiter: char) {
        if delimiter != ',' {
            self.delimiters.insert(element, delimiter);
        }
    }

    /// The kind of `oid`, `None` when the type is not known yet (created after the table was
    /// read: reload and ask again).
    pub fn kind(&self, oid: u32) -> Option<Kind> {
        self.kinds.get(&oid).copied()
    }

    fn kind_or_text(&self, oid: u32) -> Kind {
        self.kind(oid).unwrap_or(Kind::Text)
    }

    /// Appends one value's JSON to `out`.
    pub fn write(&self, out: &mut Vec<u8>, kind: Kind, text: &str) {
        match kind {
            Kind::Bool => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
            Kind::Integer if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
                out.extend_from_slice(text.as_bytes());
            }
            Kind::Float if text.parse::<f64>().is_ok_and(f64::is_finite) => {
                // PostgreSQL writes finite floats in a form JSON accepts ("1e+20", "-0.5").
                out.extend_from_slice(text.as_bytes());
            }
            // PostgreSQL validated it on input; the envelope checks the whole row once more (and
            // falls back to base64 rather than emit broken JSON), so it is not parsed here too.
            Kind::Json => out.extend_from_slice(text.as_bytes()),
            Kind::TimestampTz | Kind::Timestamp => write_string(out, &rfc3339(text)),
            Kind::Bytea => match text.strip_prefix("\\x").and_then(|hex_digits| hex::decode(hex_digits).ok()) {
                Some(bytes) => write_string(out, &base64::engine::general_purpose::STANDARD.encode(bytes)),
                None => write_string(out, text),
            },
            Kind::Array(element) => {
                let delimiter = self.delimiters.get(&element).copied().unwrap_or(',');
                self.write_array(out, self.kind_or_text(element), delimiter, text);
            }
            _ => write_string(out, text),
        }
    }

    /// A PostgreSQL array literal (`{1,2,NULL}`, `{{a,b},{"c d",e}}`, `[0:1]={x,y}`) as a
    /// JSON array of the element kind; text that is not an array literal stays a string.
    fn write_array(&self, out: &mut Vec<u8>, element: Kind, delimiter: char, text: &str) {
        let body = match text.find('=') {
            Some(eq) if text.starts_with('[') => &text[eq + 1..],
            _ => text,
        };
        let start = out.len();
        let mut chars = body.chars().peekable();
        if chars.peek() != Some(&'{')
            || !self.parse_array(out, element, delimiter, &mut chars)
            || chars.next().is_some()
        {
            out.truncate(start);
            write_string(out, text);
        }
    }

    fn parse_array(
        &self,
        out: &mut Vec<u8>,
        element: Kind,
        delimiter: char,
        chars: &mut std::iter::Peekable<std::str::Chars>,
    ) -> bool {
        if chars.next() != Some('{') {
            return false;
        }
        out.push(b'[');
        if chars.peek() == Some(&'}') {
            chars.next();
            out.push(b']');
            return true;
        }
        loop {
            match chars.peek() {
                Some('{') => {
                    if !self.parse_array(out, element, delimiter, chars) {
                        return false;
                    }
                }
                Some('"') => {
                    chars.next();
                    let mut item = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some(c) => item.push(c),
                                None => return false,
                            },
                            Some('"') => break,
                            Some(c) => item.push(c),
                            None => return false,
                        }
                    }
                    self.write(out, element, &item);
                }
                Some(_) => {
                    let mut item = String::new();
                    while let Some(&c) = chars.peek() {
                        if c == delimiter || c == '}' {
                            break;
                        }
                        item.push(c);
                        chars.next();
                    }
                    if item == "NULL" {
                        out.extend_from_slice(b"null");
                    } else {
                        self.write(out, element, item.trim());
                    }
                }
                None => return false,
            }
            match chars.next() {
                Some(c) if c == delimiter => out.push(b','),
                Some('}') => {
                    out.push(b']');
                    return true;
                }
                _ => return false,
            }
        }
    }

    /// A row as a JSON object. Unchanged TOAST values are left out and their column names
    /// returned, so they are never mistaken for NULL; `fill` (the old row under REPLICA
    /// IDENTITY FULL) supplies them when it has them.
    pub fn row(&self, columns: &[Column], values: &[Value], fill: Option<&[Value]>) -> (Vec<u8>, Vec<String>) {
        self.write_row(columns, values, fill, |_| true)
    }

    /// The replica identity columns of a key-only old row, as a JSON object (the other columns
    /// are not sent; they are not NULL).
    pub fn key_row(&self, columns: &[Column], values: &[Value]) -> Vec<u8> {
        self.write_row(columns, values, None, |column| column.key).0
    }

    fn write_row(
        &self,
        columns: &[Column],
        values: &[Value],
        fill: Option<&[Value]>,
        include: impl Fn(&Column) -> bool,
    ) -> (Vec<u8>, Vec<String>) {
        // Sized once from the names and values (quotes, separators, a timestamp's `T`), not
        // grown by doubling as it is written; escapes may still grow it.
        let names: usize = columns.iter().map(|column| column.name.len() + 4).sum();
        let texts: usize =
            values.iter().map(|value| if let Value::Text(bytes) = value { bytes.len() + 4 } else { 4 }).sum();
        let mut out = Vec::with_capacity(2 + names + texts);
        let mut unchanged = Vec::new();
        out.push(b'{');
        let mut first = true;
        for (index, (column, value)) in columns.iter().zip(values).enumerate() {
            if !include(column) {
                continue;
            }
            let value = match (value, fill.and_then(|old| old.get(index))) {
                (Value::UnchangedToast, Some(old @ Value::Text(_))) => old,
                (value, _) => value,
            };
            if matches!(value, Value::UnchangedToast) {
                unchanged.push(column.name.clone());
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_string(&mut out, &column.name);
            out.push(b':');
            match value {
                Value::Text(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    self.write(&mut out, self.kind_or_text(column.type_oid), &text);
                }
                _ => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
        (out, unchanged)
    }
}

/// The event key from the primary key columns `key_columns` (names): the value itself for a
/// one-column key, a JSON array of the values for a composite one; `None` without a key.
pub fn key(columns: &[Column], values: &[Value], key_columns: &[String]) -> Option<String> {
    let parts: Vec<String> = key_columns
        .iter()
        .filter_map(|name| columns.iter().position(|c| &c.name == name))
        .map(|index| match values.get(index) {
            Some(Value::Text(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => String::new(),
        })
        .collect();
    match parts.len() {
        0 => None,
        1 => parts.into_iter().next(),
        _ => serde_json::to_string(&parts).ok(),
    }
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing a &str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// PostgreSQL's ISO timestamp output to RFC 3339: `2026-11-23 12:00:00.5+01` →
/// `2026-11-23T12:00:00.5+01:00`. `infinity`, `-infinity` and BC dates are left as they are.
pub fn rfc3339(text: &str) -> String {
    if text.ends_with("BC") || text.as_bytes().get(10).is_none_or(|&b| b != b' ') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str(&text[..10]);
    out.push('T');
    let rest = &text[11..];
    // A bare hour offset (`+01`) gains its minutes.
    let bytes = rest.as_bytes();
    let n = bytes.len();
    if n >= 3 && (bytes[n - 3] == b'+' || bytes[n - 3] == b'-') && bytes[n - 2..].iter().all(u8::is_ascii_digit) {
        out.push_str(rest);
        out.push_str(":00");
    } else {
        out.push_str(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn types() -> Types {
        let row = |oid: u32, name: &str, element: u32, category: u8| {
            (oid, name.to_string(), b'b' as i8, element, category as i8, 0u32)
        };
        let mut rows = vec![
            row(16, "bool", 0, b'B'),
            row(23, "int4", 0, b'N'),
            row(701, "float8", 0, b'N'),
            row(1700, "numeric", 0, b'N'),
            row(3802, "jsonb", 0, b'U'),
            row(1184, "timestamptz", 0, b'D'),
            row(1114, "timestamp", 0, b'D'),
            row(17, "bytea", 0, b'U'),
            row(25, "text", 0, b'S'),
            row(1007, "_int4", 23, b'A'),
            row(1009, "_text", 25, b'A'),
        ];
        // A domain over a domain listed before its base domain, as pg_type's order may have it.
        rows.push((50001, "small_positive".into(), b'd' as i8, 0, b'N' as i8, 50000));
        rows.push((50000, "positive".into(), b'd' as i8, 0, b'N' as i8, 23));
        rows.push(row(603, "box", 0, b'G'));
        let mut types = Types::from_rows(&rows);
        types.set_delimiter(603, ';');
        types
    }

    fn json(kind: Kind, text: &str) -> String {
        let mut out = Vec::new();
        types().write(&mut out, kind, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_by_type() {
        assert_eq!(json(Kind::Bool, "t"), "true");
        assert_eq!(json(Kind::Integer, "-42"), "-42");
        assert_eq!(json(Kind::Float, "1.5e+20"), "1.5e+20");
        assert_eq!(json(Kind::Float, "NaN"), "\"NaN\"");
        assert_eq!(json(Kind::Float, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(Kind::Numeric, "12345678901234567890.000000001"), "\"12345678901234567890.000000001\"");
        assert_eq!(json(Kind::Json, r#"{"a": [1, 2]}"#), r#"{"a": [1, 2]}"#);
        assert_eq!(json(Kind::TimestampTz, "2026-11-23 12:00:00.5+01"), "\"2026-11-23T12:00:00.5+01:00\"");
        assert_eq!(json(Kind::TimestampTz, "2026-11-23 12:00:00+05:30"), "\"2026-11-23T12:00:00+05:30\"");
        assert_eq!(json(Kind::Timestamp, "infinity"), "\"infinity\"");
        assert_eq!(json(Kind::Bytea, "\\x48690a"), "\"SGkK\"");
        assert_eq!(json(Kind::Array(23), "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(json(Kind::Array(23), "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(json(Kind::Array(25), r#"{"a b","c\"d",NULL,"NULL",e}"#), r#"["a b","c\"d",null,"NULL","e"]"#);
        assert_eq!(json(Kind::Array(23), "[0:1]={7,8}"), "[7,8]");
        assert_eq!(json(Kind::Array(23), "{}"), "[]");
        assert_eq!(json(Kind::Array(23), "{1,2"), "\"{1,2\"", "not an array literal: kept as text");
        assert_eq!(types().kind(50000), Some(Kind::Integer), "a domain takes its base type's kind");
        assert_eq!(types().kind(50001), Some(Kind::Integer), "also over another domain");
        // `box` arrays separate items with `;`: the commas belong to the values.
        assert_eq!(json(Kind::Array(603), "{(1,1),(0,0);(2,2),(1,1)}"), r#"["(1,1),(0,0)","(2,2),(1,1)"]"#);
    }

    #[test]
    fn rows_keep_unchanged_toast_apart_from_null() {
        let columns = vec![
            Column { name: "id".into(), type_oid: 23, key: true },
            Column { name: "note".into(), type_oid: 25, key: false },
            Column { name: "big".into(), type_oid: 25, key: false },
        ];
        let values = vec![Value::Text(Bytes::from_static(b"7")), Value::Null, Value::UnchangedToast];
        let (row, unchanged) = types().row(&columns, &values, None);
        assert_eq!(String::from_utf8(row).unwrap(), r#"{"id":7,"note":null}"#);
        assert_eq!(unchanged, vec!["big".to_string()]);
        let old = vec![Value::Text(Bytes::from_static(b"7")), Value::Null, Value::Text(Bytes::from_static(b"x"))];
        let (row, unchanged) = types().row(&columns, &values, Some(&old));
        assert_eq!(String::from_utf8(row).unwrap(), r#"{"id":7,"note":null,"big":"x"}"#);
        assert!(unchanged.is_empty());
        assert_eq!(String::from_utf8(types().key_row(&columns, &values)).unwrap(), r#"{"id":7}"#);
        assert_eq!(key(&columns, &values, &["id".to_string()]).as_deref(), Some("7"));
        assert_eq!(key(&columns, &values, &[]), None);
    }
}
