//! Reading and editing JSON values by dotted path (`customer.email`, `items.0.price`).

use serde_json::Value;

fn step<'a>(value: &'a Value, segment: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    }
}

fn step_mut<'a>(value: &'a mut Value, segment: &str) -> Option<&'a mut Value> {
    match value {
        Value::Object(map) => map.get_mut(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
        _ => None,
    }
}

/// The value at `path`, or `None` when any segment is missing.
pub fn get<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, step)
}

/// A mutable reference to the value at `path`, or `None` when any segment is missing.
pub fn get_mut<'a>(value: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(value, step_mut)
}

/// Removes the value at `path` and returns it; `None` when it was not there.
pub fn remove(value: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (get_mut(value, parent)?, last),
        None => (value, path),
    };
    match parent {
        Value::Object(map) => map.remove(last),
        Value::Array(items) => {
            let index = last.parse::<usize>().ok().filter(|i| *i < items.len())?;
            Some(items.remove(index))
        }
        _ => None,
    }
}

/// Sets the value at `path`, creating objects for missing segments. Returns `false` when a
/// segment on the way is a value that cannot hold children (a string, number, …).
pub fn set(value: &mut Value, path: &str, new_value: Value) -> bool {
    let mut current = value;
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        if current.is_null() {
            *current = Value::Object(Default::default());
        }
        current = match current {
            Value::Object(map) => {
                if is_last {
                    map.insert(segment.to_string(), new_value);
                    return true;
                }
                map.entry(segment.to_string()).or_insert(Value::Null)
            }
            Value::Array(items) => match segment.parse::<usize>().ok().filter(|i| *i < items.len()) {
                Some(index) if is_last => {
                    items[index] = new_value;
                    return true;
                }
                Some(index) => &mut items[index],
                None => return false,
            },
            _ => return false,
        };
    }
    false
}

/// The value rendered as text the way a person would write it: strings without quotes, other
/// values as JSON.
pub fn to_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_reach_into_objects_and_arrays() {
        let mut v = json!({"a": {"b": [1, {"c": "x"}]}});
        assert_eq!(get(&v, "a.b.1.c"), Some(&json!("x")));
        assert_eq!(get(&v, "a.z"), None);
        assert_eq!(remove(&mut v, "a.b.0"), Some(json!(1)));
        assert_eq!(v, json!({"a": {"b": [{"c": "x"}]}}));
        assert!(set(&mut v, "a.n.m", json!(2)));
        assert_eq!(get(&v, "a.n.m"), Some(&json!(2)));
        assert!(!set(&mut v, "a.n.m.k", json!(3)), "cannot descend into a number");
        assert!(set(&mut v, "a.b.0.c", json!("y")));
        assert_eq!(get(&v, "a.b.0.c"), Some(&json!("y")));
        assert_eq!(to_text(&json!("s")), "s");
        assert_eq!(to_text(&json!(1.5)), "1.5");
    }
}
