//! [`SqlInbox`]: the inbox on SQLite or PostgreSQL, through sqlx's `Any` driver. The SQL is
//! written once, in what both understand (`$n` parameters, `ON CONFLICT`, row values).
//!
//! Two tables: `sse_inbox_items` (one row per kept event; `user_id` is NULL for a broadcast,
//! kept once for everyone) and `sse_inbox_state` (one row per user and item that user read
//! or archived; no row means unread). The schema is created and migrated at start, under an
//! advisory lock on PostgreSQL so instances that start together take turns.

use std::{path::Path, time::Duration};

use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, Row,
};

use super::{
    InboxCounts, InboxCursor, InboxError, InboxOp, InboxQuery, InboxStatus, InboxStore, NewItem, Selection,
};
use crate::api::{InboxItem, InboxPage};

/// The schema, one list of statements per version; applied in order, once each.
const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE sse_inbox_items (
        id BIGINT PRIMARY KEY,
        user_id TEXT,
        event TEXT NOT NULL,
        data TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    )",
    "CREATE INDEX sse_inbox_items_by_user ON sse_inbox_items (user_id, created_ms, id)",
    "CREATE INDEX sse_inbox_items_by_age ON sse_inbox_items (created_ms)",
    "CREATE TABLE sse_inbox_state (
        user_id TEXT NOT NULL,
        item_id BIGINT NOT NULL REFERENCES sse_inbox_items (id) ON DELETE CASCADE,
        read_ms BIGINT,
        archived_ms BIGINT,
        PRIMARY KEY (user_id, item_id)
    )",
    "CREATE INDEX sse_inbox_state_by_item ON sse_inbox_state (item_id)",
]];

/// Rows of one multi-row insert (5 parameters each, far below either database's limit).
const ROWS_PER_INSERT: usize = 500;

/// The items `$1` sees (their own and broadcasts), with `$1`'s state of each.
const VISIBLE: &str = "FROM sse_inbox_items i
    LEFT JOIN sse_inbox_state s ON s.item_id = i.id AND s.user_id = $1
    WHERE (i.user_id = $1 OR i.user_id IS NULL)";

/// The inbox in a SQL database.
pub struct SqlInbox {
    pool: AnyPool,
    max_per_user: usize,
}

impl SqlInbox {
    /// Connects to `url` (`sqlite://<file>`, created with its folder if missing, or
    /// `postgres://...`) and brings the schema up to date. Keeps at most `max_per_user`
    /// items per user (and as many broadcasts).
    pub async fn connect(url: &str, max_per_user: usize) -> Result<Self, InboxError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite { sqlite_url(url)? } else { url.to_string() };
        let pool = AnyPoolOptions::new()
            // SQLite takes one writer at a time anyway; PostgreSQL gets a few per instance.
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(5))
            .connect(&url)
            .await?;
        if sqlite {
            // Readers do not wait for the writer (and it persists in the file).
            sqlx::query("PRAGMA journal_mode=WAL")
                .fetch_optional(&pool)
                .await?;
        }
        migrate(&pool, !sqlite).await?;
        Ok(Self { pool, max_per_user })
    }

    /// Drops `owner`'s oldest items past the limit (at most 1,000 at a time); `None`: the
    /// kept broadcasts'.
    async fn trim_one(&self, owner: Option<&str>) -> Result<(), InboxError> {
        let trim = |owner: &str, keep: &str| {
            format!(
                "DELETE FROM sse_inbox_items WHERE id IN (
                    SELECT id FROM sse_inbox_items WHERE {owner}
                    ORDER BY created_ms DESC, id DESC LIMIT 1000 OFFSET {keep})"
            )
        };
        let keep = self.max_per_user as i64;
        match owner {
            Some(user) => {
                let sql = trim("user_id = $1", "$2");
                sqlx::query(&sql)
                    .bind(user)
                    .bind(keep)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                let sql = trim("user_id IS NULL", "$1");
                sqlx::query(&sql).bind(keep).execute(&self.pool).await?
            }
        };
        Ok(())
    }
}

/// A multi-row insert of `rows` items (at most [`ROWS_PER_INSERT`]), bound by [`bind_items`].
fn insert_sql(rows: usize) -> String {
    let rows: Vec<String> = (0..rows)
        .map(|i| {
            let p = i * 5;
            format!("(${}, ${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4, p + 5)
        })
        .collect();
    format!(
        "INSERT INTO sse_inbox_items (id, user_id, event, data, created_ms) VALUES {}
         ON CONFLICT (id) DO NOTHING",
        rows.join(", ")
    )
}

fn bind_items<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    items: &'q [NewItem],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for item in items {
        query = query
            .bind(item.id as i64)
            .bind(item.user.as_deref().map(str::to_string))
            .bind(item.event.to_string())
            .bind(item.data.as_str())
            .bind(item.created_ms as i64);
    }
    query
}

/// `sqlite://<file>` with the file's folder made and `mode=rwc`, so a first start creates it.
fn sqlite_url(url: &str) -> Result<String, InboxError> {
    let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_string());
    }
    if let Some(folder) = Path::new(path).parent().filter(|f| !f.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder)
            .map_err(|e| InboxError::Store(format!("cannot create {}: {e}", folder.display())))?;
    }
    Ok(if rest.contains('?') {
        format!("sqlite://{rest}")
    } else {
        format!("sqlite://{rest}?mode=rwc")
    })
}

/// Applies the migrations the database has not seen, in one transaction.
async fn migrate(pool: &AnyPool, postgres: bool) -> Result<(), InboxError> {
    let mut tx = pool.begin().await?;
    if postgres {
        // Instances starting together wait here for the first to finish.
        sqlx::query("SELECT pg_advisory_xact_lock(7203115)")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("CREATE TABLE IF NOT EXISTS sse_inbox_schema (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await?;
    let applied: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM sse_inbox_schema")
        .fetch_one(&mut *tx)
        .await?
        .try_get("v")?;
    for (index, statements) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        for statement in *statements {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO sse_inbox_schema (version) VALUES ($1)")
            .bind(index as i64 + 1)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn item(row: &AnyRow) -> Result<InboxItem, InboxError> {
    let data: String = row.try_get("data")?;
    let optional = |name: &str| -> Result<Option<u64>, InboxError> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(|v| v as u64))
    };
    Ok(InboxItem {
        id: row.try_get::<i64, _>("id")?.to_string(),
        event: row.try_get("event")?,
        data: serde_json::from_str(&data)
            .map_err(|e| InboxError::Store(format!("a stored item is not JSON: {e}")))?,
        created: row.try_get::<i64, _>("created_ms")? as u64,
        read: optional("read_ms")?,
        archived: optional("archived_ms")?,
    })
}

#[async_trait::async_trait]
impl InboxStore for SqlInbox {
    async fn keep(&self, items: &[NewItem]) -> Result<(), InboxError> {
        // One statement, one round trip, for a batch of up to ROWS_PER_INSERT (the
        // publish waits for it); a bigger one in one transaction.
        if items.len() <= ROWS_PER_INSERT {
            if !items.is_empty() {
                let sql = insert_sql(items.len());
                bind_items(sqlx::query(&sql), items).execute(&self.pool).await?;
            }
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in items.chunks(ROWS_PER_INSERT) {
            let sql = insert_sql(chunk.len());
            bind_items(sqlx::query(&sql), chunk).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn trim(&self, owners: &[&str], broadcasts: bool) -> Result<(), InboxError> {
        // One query for which owners are past the limit, then a trim of each of those. Per
        // owner it asks whether a row past the newest `max_per_user` exists: an index walk
        // of at most that many rows, whatever the table holds (a GROUP BY over an IN list
        // of hundreds of owners may scan the whole table instead).
        for chunk in owners.chunks(ROWS_PER_INSERT) {
            let list: Vec<String> = (1..=chunk.len()).map(|i| format!("(${i})")).collect();
            let sql = format!(
                "SELECT o.column1 AS user_id FROM (VALUES {}) AS o WHERE EXISTS (
                    SELECT 1 FROM sse_inbox_items i WHERE i.user_id = o.column1
                    ORDER BY i.created_ms DESC LIMIT 1 OFFSET ${})",
                list.join(", "),
                chunk.len() + 1
            );
            let mut over = sqlx::query(&sql);
            for owner in chunk {
                over = over.bind(*owner);
            }
            let rows = over.bind(self.max_per_user as i64).fetch_all(&self.pool).await?;
            for row in rows {
                let user: String = row.try_get("user_id")?;
                self.trim_one(Some(&user)).await?;
            }
        }
        if broadcasts {
            self.trim_one(None).await?;
        }
        Ok(())
    }

    async fn list(&self, user: &str, query: &InboxQuery) -> Result<InboxPage, InboxError> {
        let status = match query.status {
            InboxStatus::All => "s.archived_ms IS NULL",
            InboxStatus::Unread => "s.archived_ms IS NULL AND s.read_ms IS NULL",
            InboxStatus::Archived => "s.archived_ms IS NOT NULL",
        };
        let limit = match query.limit {
            0 => super::DEFAULT_PAGE,
            n => n.min(super::MAX_PAGE),
        };
        let before = query.before.unwrap_or(InboxCursor {
            created_ms: i64::MAX as u64,
            id: i64::MAX as u64,
        });
        let sql = format!(
            "SELECT i.id, i.event, i.data, i.created_ms, s.read_ms, s.archived_ms {VISIBLE}
             AND {status} AND (i.created_ms < $2 OR (i.created_ms = $2 AND i.id < $3))
             ORDER BY i.created_ms DESC, i.id DESC LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(user)
            .bind(before.created_ms.min(i64::MAX as u64) as i64)
            .bind(before.id.min(i64::MAX as u64) as i64)
            .bind(limit as i64 + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(item).collect::<Result<Vec<_>, _>>()?;
        let next = (items.len() > limit).then(|| {
            items.truncate(limit);
            let last = &items[limit - 1];
            InboxCursor {
                created_ms: last.created,
                id: last.id.parse().unwrap_or(0),
            }
            .to_string()
        });
        let counts = self.counts(user).await?;
        Ok(InboxPage {
            items,
            unread: counts.unread,
            total: counts.total,
            next,
        })
    }

    async fn counts(&self, user: &str) -> Result<InboxCounts, InboxError> {
        let sql = format!(
            "SELECT COUNT(*) AS total,
                    COALESCE(SUM(CASE WHEN s.read_ms IS NULL THEN 1 ELSE 0 END), 0) AS unread
             {VISIBLE} AND s.archived_ms IS NULL"
        );
        let row = sqlx::query(&sql).bind(user).fetch_one(&self.pool).await?;
        Ok(InboxCounts {
            unread: row.try_get::<i64, _>("unread")? as u64,
            total: row.try_get::<i64, _>("total")? as u64,
        })
    }

    async fn change(
        &self,
        user: &str,
        op: InboxOp,
        selection: &Selection,
        now_ms: u64,
    ) -> Result<(), InboxError> {
        // Read and archive write a state row (made if missing); unread and unarchive clear
        // a column of one that exists (no row is already unread and not archived).
        let (column, at) = match op {
            InboxOp::Read => ("read_ms", Some(now_ms as i64)),
            InboxOp::Unread => ("read_ms", None),
            InboxOp::Archive => ("archived_ms", Some(now_ms as i64)),
            InboxOp::Unarchive => ("archived_ms", None),
        };
        let set = |which: &str| {
            format!(
                "INSERT INTO sse_inbox_state (user_id, item_id, {column})
                 SELECT $1, i.id, $2 {VISIBLE} AND s.{column} IS NULL AND {which}
                 ON CONFLICT (user_id, item_id) DO UPDATE SET {column} = excluded.{column}"
            )
        };
        let clear = |which: &str| {
            format!(
                "UPDATE sse_inbox_state SET {column} = NULL
                 WHERE user_id = $1 AND {column} IS NOT NULL AND {which}"
            )
        };
        let mut tx = self.pool.begin().await?;
        match (at, selection) {
            (Some(at), Selection::All) => {
                let sql = set("1 = 1");
                sqlx::query(&sql).bind(user).bind(at).execute(&mut *tx).await?;
            }
            (Some(at), Selection::Ids(ids)) => {
                let sql = set("i.id = $3");
                for id in ids {
                    sqlx::query(&sql)
                        .bind(user)
                        .bind(at)
                        .bind(*id as i64)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            (None, Selection::All) => {
                let sql = clear("1 = 1");
                sqlx::query(&sql).bind(user).execute(&mut *tx).await?;
            }
            (None, Selection::Ids(ids)) => {
                let sql = clear("item_id = $2");
                for id in ids {
                    sqlx::query(&sql)
                        .bind(user)
                        .bind(*id as i64)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn prune(&self, before_ms: u64, batch: usize) -> Result<u64, InboxError> {
        let done = sqlx::query(
            "DELETE FROM sse_inbox_items WHERE id IN (
                SELECT id FROM sse_inbox_items WHERE created_ms < $1 LIMIT $2)",
        )
        .bind(before_ms.min(i64::MAX as u64) as i64)
        .bind(batch as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

impl std::fmt::Debug for SqlInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlInbox")
            .field("max_per_user", &self.max_per_user)
            .finish()
    }
}
