//! The notification center's store: each user's kept events, with read and archived state
//! per user, durable across restarts and shared by every instance.
//!
//! [`InboxStore`] is what the core needs of a store; [`SqlInbox`] is the one this crate
//! ships, on SQLite (a file, the embedded default) or PostgreSQL (any number of
//! instances), picked by the URL. The core ([`UserInbox`](crate::server::core::inbox::UserInbox))
//! decides what is kept and tells every stream of the user what changed.

mod sql;

use std::sync::Arc;

pub use sql::SqlInbox;

pub use crate::api::InboxCounts;
use crate::api::InboxPage;

/// Why the inbox could not do something.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// No store is configured (`SSE_INBOX_URL` unset).
    #[error("the inbox is off: set SSE_INBOX_URL to sqlite://<file> or postgres://... to turn it on")]
    Off,
    /// A request the inbox cannot take; `field` names what to fix.
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    /// The store failed or cannot be reached; nothing was changed.
    #[error("the inbox store failed: {0}")]
    Store(String),
}

impl From<sqlx::Error> for InboxError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.to_string())
    }
}

/// An event to keep: its id, whose it is (`None`: a broadcast, kept once for everyone),
/// its name and data, and when it was published.
#[derive(Debug, Clone)]
pub struct NewItem {
    pub id: u64,
    pub user: Option<Arc<str>>,
    pub event: Arc<str>,
    pub data: String,
    pub created_ms: u64,
}

/// Which items a listing shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum InboxStatus {
    /// Not archived (read or not).
    #[default]
    All,
    /// Not read and not archived.
    Unread,
    /// Archived only.
    Archived,
}

impl InboxStatus {
    /// `all`, `unread` or `archived`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(Self::All),
            "unread" => Some(Self::Unread),
            "archived" => Some(Self::Archived),
            _ => None,
        }
    }
}

/// A page request: which items, from where (newest first), how many.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxQuery {
    pub status: InboxStatus,
    /// The `next` of the page before; `None` starts at the newest.
    pub before: Option<InboxCursor>,
    /// 1 to [`MAX_PAGE`]; 0 means [`DEFAULT_PAGE`].
    pub limit: usize,
}

/// Items per page at most.
pub const MAX_PAGE: usize = 100;
/// Items per page unless asked otherwise.
pub const DEFAULT_PAGE: usize = 20;
/// Ids one change may name (the most a user keeps by default).
pub const MAX_IDS: usize = 1_000;

/// Where a page ends: the last item's publish time and id (`<ms>.<id>` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxCursor {
    pub created_ms: u64,
    pub id: u64,
}

impl InboxCursor {
    /// Reads `<ms>.<id>`, as [`InboxPage::next`] gives it.
    pub fn parse(s: &str) -> Option<Self> {
        let (created_ms, id) = s.split_once('.')?;
        Some(Self {
            created_ms: created_ms.parse().ok()?,
            id: id.parse().ok()?,
        })
    }
}

impl std::fmt::Display for InboxCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_ms, self.id)
    }
}

/// What a change does to the items it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOp {
    Read,
    Unread,
    Archive,
    Unarchive,
}

impl InboxOp {
    /// The `op` of the `inbox` event: `read`, `unread`, `archived`, `unarchived`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Unread => "unread",
            Self::Archive => "archived",
            Self::Unarchive => "unarchived",
        }
    }
}

/// Which items a change applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These ids; ones that are not the user's (unknown, another user's) are ignored.
    Ids(Vec<u64>),
    /// Every item of the user.
    All,
}

/// What the core needs of a store. Every method is one user's (or, for
/// [`keep`](Self::keep) and [`prune`](Self::prune), a bounded batch's) work.
#[async_trait::async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// Keeps `items` (an id already kept is left as it is). A publish waits for it, so
    /// it does nothing more: the per-user limit is [`trim`](Self::trim)'s.
    async fn keep(&self, items: &[NewItem]) -> Result<(), InboxError>;

    /// Drops the oldest items of each of `owners` past the per-user limit, and of the
    /// kept broadcasts with `broadcasts`. The core calls it for the owners of what it kept,
    /// off the publish path, within about a second.
    async fn trim(&self, owners: &[&str], broadcasts: bool) -> Result<(), InboxError>;

    /// A page of `user`'s items, newest first, with the counts.
    async fn list(&self, user: &str, query: &InboxQuery) -> Result<InboxPage, InboxError>;

    async fn counts(&self, user: &str) -> Result<InboxCounts, InboxError>;

    /// Applies `op` to the selected items of `user`'s.
    async fn change(
        &self,
        user: &str,
        op: InboxOp,
        selection: &Selection,
        now_ms: u64,
    ) -> Result<(), InboxError>;

    /// Deletes at most `batch` items published before `before_ms`; returns how many.
    async fn prune(&self, before_ms: u64, batch: usize) -> Result<u64, InboxError>;
}
