//! The SQL the relay runs, built once from the configured names.
//!
//! Names come from flags, so every identifier is quoted; values are always
//! bind parameters.

/// Why a configured name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or an empty part in `schema.table`.
    #[error("{what} must not be empty")]
    Empty {
        /// Which setting.
        what: &'static str,
    },
    /// More than `schema.table`.
    #[error("{what} {name:?} has more than two dot-separated parts")]
    TooManyParts {
        /// Which setting.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A NUL byte, which PostgreSQL identifiers cannot hold.
    #[error("{what} must not contain NUL")]
    Nul {
        /// Which setting.
        what: &'static str,
    },
}

/// Quotes one identifier (`"` doubled), so any name is taken literally.
fn quote_ident(part: &str) -> String {
    format!("\"{}\"", part.replace('"', "\"\""))
}

/// Quotes `table` or `schema.table`.
pub fn quote_name(what: &'static str, name: &str) -> Result<String, NameError> {
    if name.contains('\0') {
        return Err(NameError::Nul { what });
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(NameError::TooManyParts {
            what,
            name: name.to_owned(),
        });
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(NameError::Empty { what });
    }
    Ok(parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join("."))
}

/// Quotes a single column name.
pub fn quote_column(what: &'static str, name: &str) -> Result<String, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.contains('\0') {
        return Err(NameError::Nul { what });
    }
    Ok(quote_ident(name))
}

/// The statements of one relay configuration.
#[derive(Debug, Clone)]
pub struct Statements {
    /// Claims up to `$1` committed rows, locking them; rows locked by
    /// another relay are skipped, never waited for.
    pub claim: String,
    /// Copies row `$1` into the dead-letter table with reason `$2`.
    pub dead_letter: String,
    /// Deletes the claimed rows `$1` (a `bigint[]`).
    pub delete: String,
    /// Age in seconds of the oldest row (lowest id) still in the table,
    /// and the id range's width as a cheap backlog estimate.
    pub backlog: String,
}

/// The columns read from a row, in the order [`super::row`] expects them.
/// Casts make tables whose text columns are `varchar` or whose headers are
/// `json`/`text` work too.
const COLUMNS: &str = "o.id, o.message_id::text, o.exchange::text, o.routing_key::text, \
     o.payload, o.headers::text, o.content_type::text, \
     (extract(epoch from o.created_at) * 1000)::float8";

impl Statements {
    /// Builds the statements for quoted `table`, `dead_table` and, when
    /// ordering by key, the quoted key column.
    pub fn new(table: &str, dead_table: &str, order_by: Option<&str>) -> Self {
        let claim = match order_by {
            // Never an `id > last_id` cursor: a transaction that committed
            // late leaves rows below any cursor. Each round looks at every
            // committed row from the lowest id.
            None => format!(
                "SELECT {COLUMNS} FROM {table} AS o ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
            ),
            // Only a key's oldest committed row may leave: while it is
            // locked (being relayed by someone) the key's later rows are
            // not candidates for anybody, so a key is relayed by one relay
            // at a time, in id order.
            Some(key) => format!(
                "SELECT {COLUMNS} FROM {table} AS o \
                 WHERE NOT EXISTS (SELECT 1 FROM {table} AS i \
                   WHERE i.{key} IS NOT DISTINCT FROM o.{key} AND i.id < o.id) \
                 ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
            ),
        };
        Self {
            claim,
            dead_letter: format!(
                "INSERT INTO {dead_table} \
                 (id, message_id, exchange, routing_key, payload, headers, content_type, created_at, reason) \
                 SELECT id, message_id::text, exchange::text, routing_key::text, payload, headers::text, \
                 content_type::text, created_at, $2 FROM {table} WHERE id = $1"
            ),
            delete: format!("DELETE FROM {table} WHERE id = ANY($1)"),
            backlog: format!(
                "SELECT extract(epoch from now() - created_at)::float8 FROM {table} ORDER BY id LIMIT 1"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_literally() {
        assert_eq!(
            quote_name("t", "warren_outbox").unwrap(),
            "\"warren_outbox\""
        );
        assert_eq!(quote_name("t", "app.Outbox").unwrap(), "\"app\".\"Outbox\"");
        assert_eq!(
            quote_name("t", "x\"; drop table y; --").unwrap(),
            "\"x\"\"; drop table y; --\""
        );
        assert!(matches!(
            quote_name("t", "a.b.c"),
            Err(NameError::TooManyParts { .. })
        ));
        assert!(matches!(
            quote_name("t", "a."),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            quote_column("c", ""),
            Err(NameError::Empty { .. })
        ));
    }

    #[test]
    fn claims_skip_locked_rows_and_never_use_a_cursor() {
        let s = Statements::new("\"t\"", "\"t_dead\"", None);
        assert!(s.claim.contains("FOR UPDATE OF o SKIP LOCKED"));
        assert!(!s.claim.contains('>'), "no id cursor: {}", s.claim);
        let s = Statements::new("\"t\"", "\"t_dead\"", Some("\"agg\""));
        assert!(
            s.claim
                .contains("i.\"agg\" IS NOT DISTINCT FROM o.\"agg\" AND i.id < o.id")
        );
        assert!(s.dead_letter.starts_with("INSERT INTO \"t_dead\""));
    }
}
