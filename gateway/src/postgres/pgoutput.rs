//! A decoder for the row messages of PostgreSQL's `pgoutput` logical decoding plugin
//! (protocol version 1). Begin, Commit and logical messages are parsed by the replication
//! client; everything else arrives here as the raw payload of an XLogData message.
//!
//! Format: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.

use bytes::Bytes;

/// A decoding failure: the server sent something this decoder does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(String);

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Data type OID (`pg_type.oid`).
    pub type_oid: u32,
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
}

/// A table's shape, sent before its first change in each session and again after DDL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table OID.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// `REPLICA IDENTITY`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<Column>,
}

/// One column value of a row as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL (also every non-key column of a key-only old row).
    Null,
    /// A TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// The value in PostgreSQL's text format.
    Text(Bytes),
}

/// A row: one value per column of the relation.
pub type Tuple = Vec<Value>;

/// Which old row an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity columns (`K`).
    Key,
    /// The whole old row (`O`, REPLICA IDENTITY FULL).
    Full,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A table's shape.
    Relation(Relation),
    /// A custom type's name (enums, domains).
    Type { oid: u32, schema: String, name: String },
    /// A new row.
    Insert { relation: u32, new: Tuple },
    /// A changed row; `old` as REPLICA IDENTITY allows.
    Update { relation: u32, old: Option<(OldKind, Tuple)>, new: Tuple },
    /// A deleted row: its key, or all of it under REPLICA IDENTITY FULL.
    Delete { relation: u32, old: (OldKind, Tuple) },
    /// Tables emptied by one `TRUNCATE`.
    Truncate { relations: Vec<u32>, cascade: bool, restart_identity: bool },
    /// Anything else (origin, and messages this gateway has no use for).
    Other(u8),
}

struct Reader {
    data: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.data.len() - self.at < n {
            return Err(DecodeError(format!("needed {n} more bytes at offset {}", self.at)));
        }
        let slice = self.data.slice(self.at..self.at + n);
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| DecodeError("unterminated string".into()))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' | b'b' => {
                    let len = self.u32()?;
                    Value::Text(self.take(len as usize)?)
                }
                other => return Err(DecodeError(format!("unknown tuple value kind {:?}", char::from(other)))),
            });
        }
        Ok(values)
    }

    fn old_kind(&mut self) -> Result<OldKind, DecodeError> {
        match self.u8()? {
            b'K' => Ok(OldKind::Key),
            b'O' => Ok(OldKind::Full),
            other => Err(DecodeError(format!("expected K or O, got {:?}", char::from(other)))),
        }
    }

    fn expect(&mut self, tag: u8) -> Result<(), DecodeError> {
        let got = self.u8()?;
        if got != tag {
            return Err(DecodeError(format!("expected {:?}, got {:?}", char::from(tag), char::from(got))));
        }
        Ok(())
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let oid = r.u32()?;
            let schema = r.string()?;
            let table = r.string()?;
            let replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let _type_modifier = r.u32()?;
                columns.push(Column { name, type_oid, key: flags & 1 == 1 });
            }
            Message::Relation(Relation { oid, schema, table, replica_identity, columns })
        }
        b'Y' => {
            let oid = r.u32()?;
            let schema = r.string()?;
            let name = r.string()?;
            Message::Type { oid, schema, name }
        }
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N')?;
            Message::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.data.get(r.at) {
                Some(b'K' | b'O') => {
                    let kind = r.old_kind()?;
                    Some((kind, r.tuple()?))
                }
                _ => None,
            };
            r.expect(b'N')?;
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.old_kind()?;
            Message::Delete { relation, old: (kind, r.tuple()?) }
        }
        b'T' => {
            let count = r.u32()?;
            let options = r.u8()?;
            let relations = (0..count).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Message::Truncate { relations, cascade: options & 1 == 1, restart_identity: options & 2 == 2 }
        }
        // Streamed (v2) and two-phase (v3) transactions: weir asks for protocol 1, so these
        // never come; should one, skipping it would lose or mix up changes.
        b'S' | b'E' | b'A' | b'c' | b'b' | b'P' | b'K' | b'r' | b'p' => {
            return Err(DecodeError(format!(
                "message `{}` belongs to a streamed or two-phase transaction, which weir does not ask for",
                tag as char
            )));
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_streamed_transactions_are_refused_not_skipped() {
        for tag in [b'S', b'E', b'A', b'c', b'P'] {
            let error = decode(Bytes::from(vec![tag, 0, 0, 0, 1])).unwrap_err();
            assert!(error.to_string().contains("streamed or two-phase"), "{error}");
        }
        assert_eq!(decode(Bytes::from_static(b"O")), Ok(Message::Other(b'O')));
    }

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut out = (values.len() as u16).to_be_bytes().to_vec();
        for value in values {
            match value {
                None => out.push(b'n'),
                Some("<unchanged>") => out.push(b'u'),
                Some(text) => {
                    out.push(b't');
                    out.extend((text.len() as u32).to_be_bytes());
                    out.extend(text.as_bytes());
                }
            }
        }
        out
    }

    /// A Relation message for `public.orders` (oid 16385) with `(flags, name, type oid)` columns.
    fn relation(columns: &[(u8, &str, u32)]) -> Vec<u8> {
        let mut relation = vec![b'R'];
        relation.extend(16385u32.to_be_bytes());
        relation.extend(b"public\0orders\0d");
        relation.extend((columns.len() as u16).to_be_bytes());
        for (flags, name, type_oid) in columns {
            relation.push(*flags);
            relation.extend(name.as_bytes());
            relation.push(0);
            relation.extend(type_oid.to_be_bytes());
            relation.extend((-1i32).to_be_bytes());
        }
        relation
    }

    #[test]
    fn relation_and_changes() {
        let relation = relation(&[(1, "id", 23), (0, "note", 25)]);
        let Message::Relation(decoded) = decode(Bytes::from(relation)).unwrap() else { panic!() };
        assert_eq!((decoded.schema.as_str(), decoded.table.as_str()), ("public", "orders"));
        assert!(decoded.columns[0].key && !decoded.columns[1].key);
        assert_eq!(decoded.columns[1].type_oid, 25);

        let mut update = vec![b'U'];
        update.extend(16385u32.to_be_bytes());
        update.push(b'K');
        update.extend(tuple(&[Some("7"), None]));
        update.push(b'N');
        update.extend(tuple(&[Some("8"), Some("<unchanged>")]));
        let Message::Update { old, new, .. } = decode(Bytes::from(update)).unwrap() else { panic!() };
        assert_eq!(old, Some((OldKind::Key, vec![Value::Text(Bytes::from_static(b"7")), Value::Null])));
        assert_eq!(new[1], Value::UnchangedToast);

        let mut truncate = vec![b'T'];
        truncate.extend(2u32.to_be_bytes());
        truncate.push(1);
        truncate.extend(1u32.to_be_bytes());
        truncate.extend(2u32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(truncate)).unwrap(),
            Message::Truncate { relations: vec![1, 2], cascade: true, restart_identity: false }
        );
    }

    /// Random bytes, and valid messages with bytes flipped, cut short or grown: each decodes or
    /// is an error, never a panic or a huge allocation (a length field can claim 4 GiB).
    #[test]
    fn arbitrary_and_mutated_input_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut insert = vec![b'I'];
        insert.extend(16385u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(tuple(&[Some("42"), None, Some("<unchanged>")]));
        let relation = relation(&[(1, "id", 23)]);
        let truncate = [b'T', 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 1];
        let seeds: [&[u8]; 3] = [&insert, &relation, &truncate];
        for round in 0..200_000 {
            let mut bytes = seeds[round % seeds.len()].to_vec();
            match next() % 4 {
                0 => {
                    let length = (next() % 64) as usize;
                    bytes = (0..length).map(|_| next() as u8).collect();
                    if let Some(first) = bytes.first_mut() {
                        *first = b"RYIUDTBCX"[(next() % 9) as usize];
                    }
                }
                1 => {
                    for _ in 0..=next() % 3 {
                        let at = (next() as usize) % bytes.len();
                        bytes[at] = next() as u8;
                    }
                }
                2 => bytes.truncate((next() as usize) % bytes.len()),
                _ => bytes.extend((0..next() % 8).map(|_| next() as u8)),
            }
            let _ = decode(Bytes::from(bytes));
        }
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for bytes in [&b"R\0\0"[..], b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab", b"D\0\0\0\x01X", b"U\0\0\0\x01Q"] {
            assert!(decode(Bytes::copy_from_slice(bytes)).is_err(), "{bytes:?}");
        }
    }
}
