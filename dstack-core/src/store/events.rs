//! Reading and pruning the `events` table (written by the triggers of migration 16).

use rusqlite::types::Value;
use rusqlite::Connection;

use super::StoreError;
#[cfg(test)]
use crate::events::RecordRef;
use crate::events::{Event, EventQuery, Target, TargetType};

/// The columns an [`Event`] is read from, in [`event`]'s order.
const COLUMNS: &str = "id, recorded_at, target_type, target_id, target_name, scope_type, \
    scope_id, scope_name, replica_num, job_num, submission_num, old_status, new_status, \
    reason, reason_message";

/// The SQL of `query` and its arguments.
pub(super) fn select(query: &EventQuery) -> (String, Vec<Value>) {
    let mut conditions = Vec::new();
    let mut args = Vec::new();
    if !query.within.is_empty() {
        // One range of `events_scope` per record: a run's starts with its submission time.
        let scopes: Vec<&str> = query
            .within
            .iter()
            .map(|scope| {
                args.push(Value::Text(scope.kind.as_str().to_string()));
                if scope.kind == TargetType::Run {
                    args.push(Value::Text(scope.id.clone()));
                }
                args.push(Value::Text(scope.id.clone()));
                if scope.kind == TargetType::Run {
                    "(scope_type = ? AND scope_time = \
                     COALESCE((SELECT submitted_at FROM runs WHERE id = ?), 0) AND scope_id = ?)"
                } else {
                    "(scope_type = ? AND scope_time = 0 AND scope_id = ?)"
                }
            })
            .collect();
        conditions.push(format!("({})", scopes.join(" OR ")));
    }
    let mut any_of = |column: &str, values: Vec<Value>| {
        if !values.is_empty() {
            conditions.push(format!(
                "{column} IN ({})",
                vec!["?"; values.len()].join(",")
            ));
            args.extend(values);
        }
    };
    any_of(
        "target_id",
        query.targets.iter().cloned().map(Value::Text).collect(),
    );
    any_of(
        "target_type",
        query
            .types
            .iter()
            .map(|t| Value::Text(t.as_str().to_string()))
            .collect(),
    );
    if let Some(since) = query.since_ms {
        conditions.push("recorded_at >= ?".to_string());
        args.push(Value::Integer(i64::try_from(since).unwrap_or(i64::MAX)));
    }
    if let Some(after) = query.after {
        conditions.push(if query.ascending { "id > ?" } else { "id < ?" }.to_string());
        args.push(Value::Integer(after));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let order = if query.ascending { "ASC" } else { "DESC" };
    args.push(Value::Integer(
        i64::try_from(query.limit()).unwrap_or(i64::MAX),
    ));
    let sql = format!("SELECT {COLUMNS} FROM events{filter} ORDER BY id {order} LIMIT ?");
    (sql, args)
}

/// The events `query` selects, in its order.
pub(super) fn list(c: &Connection, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
    let (sql, args) = select(query);
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), event)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One event of a row of [`COLUMNS`].
fn event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let kind = |i: usize| -> rusqlite::Result<TargetType> {
        let text: String = row.get(i)?;
        TargetType::parse(&text).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                i,
                rusqlite::types::Type::Text,
                format!("unknown event target type {text}").into(),
            )
        })
    };
    Ok(Event {
        id: row.get(0)?,
        recorded_at_ms: row.get::<_, i64>(1)?.max(0) as u64,
        target: Target {
            kind: kind(2)?,
            id: row.get(3)?,
            name: row.get(4)?,
        },
        within: Target {
            kind: kind(5)?,
            id: row.get(6)?,
            name: row.get(7)?,
        },
        replica_num: row.get(8)?,
        job_num: row.get(9)?,
        submission_num: row.get(10)?,
        from: row.get(11)?,
        to: row.get(12)?,
        reason: row.get(13)?,
        reason_message: row.get(14)?,
    })
}

/// Deletes the events recorded before `before_ms` (but the newest) and all but the newest
/// `keep`; how many.
pub(super) fn prune(c: &Connection, before_ms: u64, keep: u64) -> Result<usize, StoreError> {
    let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    // Ids grow with time: the old events are a prefix of the table, walked from its start.
    // The newest event is always kept: new ones are numbered after it (a listing's cursor
    // stays valid).
    let old = c
        .prepare_cached(
            "DELETE FROM events WHERE id < COALESCE(
                (SELECT id FROM events WHERE recorded_at >= ?1 ORDER BY id LIMIT 1),
                (SELECT MAX(id) FROM events))",
        )?
        .execute([before])?;
    let beyond = c
        .prepare_cached("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?1")?
        .execute([keep])?;
    Ok(old + beyond)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_states_only_the_filters_it_has() {
        let (sql, args) = select(&EventQuery::default());
        assert_eq!(
            sql,
            format!("SELECT {COLUMNS} FROM events ORDER BY id DESC LIMIT ?")
        );
        assert_eq!(args, vec![Value::Integer(100)]);

        let query = EventQuery {
            within: vec![
                RecordRef {
                    kind: TargetType::Run,
                    id: "r1".into(),
                },
                RecordRef {
                    kind: TargetType::Fleet,
                    id: "f1".into(),
                },
            ],
            types: vec![TargetType::Job],
            since_ms: Some(5),
            after: Some(9),
            limit: 10,
            ascending: true,
            ..EventQuery::default()
        };
        let (sql, args) = select(&query);
        assert!(sql.ends_with(
            " WHERE ((scope_type = ? AND scope_time = \
             COALESCE((SELECT submitted_at FROM runs WHERE id = ?), 0) AND scope_id = ?) OR \
             (scope_type = ? AND scope_time = 0 AND scope_id = ?)) AND target_type IN (?) \
             AND recorded_at >= ? AND id > ? ORDER BY id ASC LIMIT ?"
        ));
        assert_eq!(
            args,
            vec![
                Value::Text("run".into()),
                Value::Text("r1".into()),
                Value::Text("r1".into()),
                Value::Text("fleet".into()),
                Value::Text("f1".into()),
                Value::Text("job".into()),
                Value::Integer(5),
                Value::Integer(9),
                Value::Integer(10),
            ]
        );
    }
}
