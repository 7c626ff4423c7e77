//! Checks incoming JSON text strictly: valid, and no object with the same key twice. Parsers
//! disagree about a repeated key (the first wins, the last wins, or it is an error), so a plugin
//! and a consumer could each read different data from one stored event.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// Objects with more keys than this are checked with a set instead of a scan.
const SCAN_UP_TO: usize = 16;

/// `Ok` when `text` is one JSON value whose objects name each key once; else what is wrong,
/// as serde_json words it (with line and column).
pub fn check(text: &str) -> Result<(), serde_json::Error> {
    let mut reader = serde_json::Deserializer::from_str(text);
    Value.deserialize(&mut reader)?;
    reader.end()
}

/// Walks one value, keeping nothing but each object's keys while it is read.
struct Value;

impl<'de> DeserializeSeed<'de> for Value {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(Value)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        // The first keys on the stack: most objects are small, and this runs for every event.
        let mut scanned: [Cow<'de, str>; SCAN_UP_TO] = std::array::from_fn(|_| Cow::Borrowed(""));
        let mut scanned_count = 0;
        let mut set: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(key) = entries.next_key_seed(Key)? {
            let repeated = if scanned_count < SCAN_UP_TO {
                let repeated = scanned[..scanned_count].contains(&key);
                scanned[scanned_count] = key.clone();
                scanned_count += 1;
                repeated
            } else {
                if set.is_empty() {
                    set.extend(scanned.iter_mut().map(std::mem::take));
                }
                !set.insert(key.clone())
            };
            if repeated {
                return Err(A::Error::custom(format!("the key {key:?} appears twice in one object")));
            }
            entries.next_value_seed(Value)?;
        }
        Ok(())
    }
}

/// An object's key, borrowed from the text unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cow<'de, str>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E>(self, key: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn a_key_twice_in_one_object_is_refused_wherever_it_is() {
        assert!(check(r#"{"a":1,"b":[{"a":2}],"c":{"a":3}}"#).is_ok(), "the same key in different objects");
        let error = check(r#"{"a":1,"b":2,"a":3}"#).unwrap_err().to_string();
        assert!(error.contains(r#"the key "a" appears twice in one object"#), "{error}");
        assert!(check(r#"[{"x":{"y":1,"y":2}}]"#).is_err());
        // Escapes spell the same key.
        assert!(check(r#"{"a":1,"\u0061":2}"#).is_err());
        // Past the scan, the set.
        let many: Vec<String> = (0..40).map(|n| format!("\"k{n}\":{n}")).collect();
        assert!(check(&format!("{{{}}}", many.join(","))).is_ok());
        assert!(check(&format!("{{{},\"k3\":0}}", many.join(","))).is_err());
    }

    #[test]
    fn anything_that_is_not_one_json_value_is_refused() {
        for text in ["", "{", r#"{"a":}"#, "[1,]", "1 2", "nul", r#"{"a":1}x"#] {
            assert!(check(text).is_err(), "{text:?}");
        }
        for text in ["null", "1.5e300", r#""é""#, "[]", "{}", " {\"a\": [true, false, null]} "] {
            assert!(check(text).is_ok(), "{text:?}");
        }
    }
}
