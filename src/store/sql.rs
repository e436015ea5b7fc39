//! SQL shared by the table files: multi-row `VALUES` lists and their chunking,
//! and reading id columns.

use std::str::FromStr;

use sqlx::any::AnyRow;
use sqlx::Row;

use super::pool::{Backend, StoreError};

/// Most rows one multi-row statement carries. Both databases bind parameters
/// by position here (see [`values_list`]), so a statement's cost grows with its
/// rows, not with their square.
pub fn rows_per_statement(backend: Backend) -> usize {
    match backend {
        // 7 columns x 256 rows stays far below SQLite's 32,766 parameters.
        Backend::Sqlite => 256,
        Backend::Postgres => 512,
    }
}

/// Splits `rows` into one slice per multi-row statement: as many full
/// statements of [`rows_per_statement`] as fit, then the rest as powers of two.
/// A handful of distinct sizes means a handful of distinct SQL texts, each
/// prepared once per connection and then served from sqlx's statement cache.
pub fn statement_chunks<T>(backend: Backend, rows: &[T]) -> impl Iterator<Item = &[T]> {
    let max = rows_per_statement(backend);
    let (full, rest) = (rows.len() / max, rows.len() % max);
    let sizes = std::iter::repeat_n(max, full).chain(
        (0..usize::BITS)
            .rev()
            .map(|bit| 1usize << bit)
            .filter(move |size| rest & size != 0),
    );
    let mut remaining = rows;
    sizes.map(move |size| {
        let (chunk, after) = remaining.split_at(size);
        remaining = after;
        chunk
    })
}

/// `rows` tuples of `columns` parameters, for a multi-row `VALUES` list.
///
/// SQLite gets anonymous `?` parameters: sqlx's SQLite driver asks SQLite for
/// every parameter's name, which SQLite finds by a linear scan of the named
/// ones, so `$N` names cost time quadratic in a statement's parameters (a third
/// of a loaded server's CPU once, at 3,500 of them); `?` are bound in order at
/// constant cost. PostgreSQL gets `$1, $2, ...`.
pub fn values_list(backend: Backend, rows: usize, columns: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for column in 0..columns {
            if column > 0 {
                out.push_str(", ");
            }
            match backend {
                Backend::Sqlite => out.push('?'),
                Backend::Postgres => {
                    let _ = write!(out, "${}", row * columns + column + 1);
                }
            }
        }
        out.push(')');
    }
    out
}

/// Reads a text column that holds a UUID into one of the id newtypes.
pub(super) fn get_id<T: FromStr>(
    row: &AnyRow,
    column: &str,
    table: &'static str,
) -> Result<T, StoreError> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|_| StoreError::Corrupt {
        table,
        detail: format!("column {column} is not a UUID"),
    })
}

/// A column holding a state's stored name, read with `parse` (one of the
/// `domain::states` enums' `parse`); a name this version of Keyward does not
/// know is a corrupt row, never a silent default.
pub(super) fn get_state<T>(
    row: &AnyRow,
    column: &str,
    table: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<T, StoreError> {
    let text: String = row.try_get(column)?;
    parse(&text).ok_or_else(|| StoreError::Corrupt {
        table,
        detail: format!("column {column} holds an unknown name"),
    })
}

/// Like [`get_id`] for a nullable column.
pub(super) fn get_opt_id<T: FromStr>(
    row: &AnyRow,
    column: &str,
    table: &'static str,
) -> Result<Option<T>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        t.parse().map_err(|_| StoreError::Corrupt {
            table,
            detail: format!("column {column} is not a UUID"),
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn values_list_numbers_parameters_row_by_row() {
        let pg = Backend::Postgres;
        assert_eq!(super::values_list(pg, 1, 2), "($1, $2)");
        assert_eq!(super::values_list(pg, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(super::values_list(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }

    #[test]
    fn statement_chunks_cover_every_row_in_order_with_few_distinct_sizes() {
        let sizes = |backend, rows: &[usize]| -> Vec<usize> {
            super::statement_chunks(backend, rows)
                .map(<[usize]>::len)
                .collect()
        };
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let max = super::rows_per_statement(backend);
            for len in [0, 1, 7, max - 1, max, max + 1, 3 * max + 100] {
                let rows: Vec<usize> = (0..len).collect();
                let joined: Vec<usize> = super::statement_chunks(backend, &rows)
                    .flatten()
                    .copied()
                    .collect();
                assert_eq!(joined, rows, "{backend:?} {len}");
                let sizes = sizes(backend, &rows);
                assert!(sizes.iter().all(|s| *s == max || s.is_power_of_two()));
                assert!(sizes.iter().all(|s| *s > 0 && *s <= max));
            }
        }
        let rows: Vec<usize> = (0..256 + 5).collect();
        assert_eq!(sizes(Backend::Sqlite, &rows), vec![256, 4, 1]);
    }
}
