//! The notification center in the core: which published events are kept, and
//! [`UserInbox`], one user's inbox for server code and the HTTP routes. Every change is
//! told to the user's streams as an `inbox` event, published like any event, so every tab,
//! device and instance hears it.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::service::{SendError, SseService};
use crate::{
    api::{InboxChange, InboxPage},
    events::names,
    server::{
        auth,
        broker::Broker,
        clock::now_ms,
        event::{Envelope, EventId, Target},
        inbox::{InboxCounts, InboxError, InboxOp, InboxQuery, InboxStore, NewItem, Selection, MAX_IDS},
    },
};

/// How often items past the retention are pruned, and how many go per statement.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: usize = 1_000;
/// How often the owners of new items are checked against the per-user limit.
const TRIM_EVERY: Duration = Duration::from_secs(1);
/// Owners waiting for [`Inbox::trim_forever`] at most; past it a publish checks its own
/// owners before it answers.
const MAX_DEFERRED: usize = 65_536;
/// Owners told of their new items in one broker publish at most. A publish is one Redis
/// script, which holds Redis for its whole length: thousands of `added` changes at once
/// held every other publish back by a few hundred milliseconds.
const ADDED_PER_PUBLISH: usize = 256;

/// The store and what it keeps.
pub(crate) struct Inbox {
    pub(crate) store: Arc<dyn InboxStore>,
    kept: Vec<String>,
    pub(crate) retention: Duration,
    pub(crate) deferred: Arc<Mutex<Owners>>,
}

/// The owners of kept items whose count is to be checked against the per-user limit: a
/// publish leaves that to [`Inbox::trim_forever`], so its acknowledgement waits for the
/// insert and the `added` change, not for a count of every owner's items.
#[derive(Default)]
pub(crate) struct Owners {
    users: HashSet<Arc<str>>,
    broadcasts: bool,
}

impl Owners {
    fn of(items: &[NewItem]) -> Self {
        let mut owners = Self::default();
        owners.extend(items);
        owners
    }

    /// What `queue` holds, leaving it empty.
    fn take(queue: &Mutex<Owners>) -> Self {
        std::mem::take(&mut *queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn extend(&mut self, items: &[NewItem]) {
        for item in items {
            match &item.user {
                Some(user) => _ = self.users.insert(user.clone()),
                None => self.broadcasts = true,
            }
        }
    }

    /// Drops the oldest items of owners past the per-user limit.
    pub(crate) async fn trim(self, store: &dyn InboxStore) {
        if self.users.is_empty() && !self.broadcasts {
            return;
        }
        let users: Vec<&str> = self.users.iter().map(|o| &**o).collect();
        if let Err(e) = store.trim(&users, self.broadcasts).await {
            // Their next kept item names them again.
            tracing::warn!(error = %e, owners = users.len(), "inbox limit not applied; trying again later");
        }
    }
}

impl Inbox {
    pub(crate) fn new(store: Arc<dyn InboxStore>, kept: Vec<String>, retention: Duration) -> Self {
        Self {
            store,
            kept,
            retention,
            deferred: Arc::default(),
        }
    }

    /// Tells the owners' streams of `items`, just kept, that their inbox grew
    /// ([`ADDED_PER_PUBLISH`] owners per publish), and hands the owners to
    /// [`trim_forever`](Self::trim_forever) (checked now when its queue is full).
    pub(crate) async fn follow_up(&self, items: &[NewItem], broker: &dyn Broker) {
        let mut events = added_events(items);
        while !events.is_empty() {
            let rest = events.split_off(events.len().min(ADDED_PER_PUBLISH));
            if let Err(e) = broker.publish(events).await {
                tracing::warn!(error = %e, "kept in the inbox, but the streams were not told");
            }
            events = rest;
        }
        let queued = {
            let mut owners = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
            let room = owners.users.len() + items.len() <= MAX_DEFERRED;
            if room {
                owners.extend(items);
            }
            room
        };
        if !queued {
            Owners::of(items).trim(self.store.as_ref()).await;
        }
    }

    /// The owners not checked yet, taken (for a last check at shutdown).
    pub(crate) fn take_deferred(&self) -> Owners {
        Owners::take(&self.deferred)
    }

    /// Checks the owners of kept items against the per-user limit once every
    /// [`TRIM_EVERY`] (every owner of that second in a few queries). Runs until its task
    /// is aborted.
    pub(crate) async fn trim_forever(store: Arc<dyn InboxStore>, deferred: Arc<Mutex<Owners>>) {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            Owners::take(&deferred).trim(store.as_ref()).await;
        }
    }

    /// The events of `envelopes` that the inbox keeps, with their place in the batch;
    /// taken before the broker takes the batch, their ids filled in once it has published
    /// ([`with_ids`]). Only these are copied.
    pub(crate) fn to_keep(&self, envelopes: &[Envelope]) -> Vec<(usize, NewItem)> {
        envelopes
            .iter()
            .enumerate()
            .filter(|(_, e)| self.kept.iter().any(|k| **k == *e.name))
            .map(|(at, e)| {
                let item = NewItem {
                    id: 0,
                    user: match &e.target {
                        Target::User(user) => Some(user.clone()),
                        Target::Broadcast => None,
                    },
                    event: e.name.clone(),
                    data: e.data.clone(),
                    created_ms: e.timestamp_ms,
                };
                (at, item)
            })
            .collect()
    }

    /// Deletes items past the retention, a batch at a time (never one long transaction),
    /// every [`PRUNE_EVERY`]; runs until its task is aborted.
    pub(crate) async fn prune_forever(store: Arc<dyn InboxStore>, retention: Duration) {
        let mut ticks = tokio::time::interval(PRUNE_EVERY);
        loop {
            ticks.tick().await;
            let before = now_ms().saturating_sub(retention.as_millis() as u64);
            loop {
                match store.prune(before, PRUNE_BATCH).await {
                    Ok(n) if n as usize == PRUNE_BATCH => tokio::time::sleep(Duration::from_millis(50)).await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox pruning failed; trying again later");
                        break;
                    }
                }
            }
        }
    }
}

/// The items of [`Inbox::to_keep`] under the ids the broker gave their events.
pub(crate) fn with_ids(to_keep: Vec<(usize, NewItem)>, ids: &[EventId]) -> Vec<NewItem> {
    to_keep
        .into_iter()
        .map(|(at, item)| NewItem {
            id: ids[at].0,
            ..item
        })
        .collect()
}

/// The `inbox` events telling each owner which of their items (owner and id) were added
/// (the unread count only for a user's own: a kept broadcast adds one to everyone's).
fn added_events(items: &[NewItem]) -> Vec<Envelope> {
    let mut by_owner: HashMap<Option<Arc<str>>, Vec<String>> = HashMap::new();
    for item in items {
        by_owner
            .entry(item.user.clone())
            .or_default()
            .push(item.id.to_string());
    }
    by_owner
        .into_iter()
        .map(|(owner, ids)| {
            let change = InboxChange {
                op: "added".into(),
                ids,
                all: false,
                unread: None,
            };
            let target = owner.map_or(Target::Broadcast, Target::User);
            change_envelope(target, &change)
        })
        .collect()
}

fn change_envelope(target: Target, change: &InboxChange) -> Envelope {
    let timestamp_ms = now_ms();
    Envelope {
        target,
        name: names::INBOX.into(),
        data: serde_json::to_string(change).expect("an inbox change is JSON"),
        timestamp_ms,
        coalesce_key: None,
    }
}

/// One user's inbox: list it, count it, mark items read or unread, archive them. Every
/// change reaches all of the user's streams (on every instance) as an `inbox` event
/// carrying the new unread count.
///
/// ```no_run
/// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::inbox::InboxError> {
/// use sse_notify::server::inbox::InboxQuery;
///
/// let inbox = sse.inbox("alice")?;
/// let page = inbox.list(&InboxQuery::default()).await?;
/// println!("{} unread of {}", page.unread, page.total);
/// inbox.mark_all_read().await?;
/// # Ok(()) }
/// ```
pub struct UserInbox {
    service: SseService,
    store: Arc<dyn InboxStore>,
    user: Arc<str>,
}

impl UserInbox {
    pub(crate) fn new(
        service: &SseService,
        store: Arc<dyn InboxStore>,
        user: &str,
    ) -> Result<Self, InboxError> {
        auth::validate_user_id(user).map_err(|message| InboxError::Invalid {
            field: "user_id",
            message: message.to_string(),
        })?;
        Ok(Self {
            service: service.clone(),
            store,
            user: user.into(),
        })
    }

    /// A page, newest first, with the unread and total counts.
    pub async fn list(&self, query: &InboxQuery) -> Result<InboxPage, InboxError> {
        self.store.list(&self.user, query).await
    }

    pub async fn counts(&self) -> Result<InboxCounts, InboxError> {
        self.store.counts(&self.user).await
    }

    pub async fn mark_read(&self, ids: &[EventId]) -> Result<InboxCounts, InboxError> {
        self.change(InboxOp::Read, Selection::Ids(ids.iter().map(|id| id.0).collect()))
            .await
    }

    pub async fn mark_all_read(&self) -> Result<InboxCounts, InboxError> {
        self.change(InboxOp::Read, Selection::All).await
    }

    pub async fn mark_unread(&self, ids: &[EventId]) -> Result<InboxCounts, InboxError> {
        self.change(
            InboxOp::Unread,
            Selection::Ids(ids.iter().map(|id| id.0).collect()),
        )
        .await
    }

    pub async fn archive(&self, ids: &[EventId]) -> Result<InboxCounts, InboxError> {
        self.change(
            InboxOp::Archive,
            Selection::Ids(ids.iter().map(|id| id.0).collect()),
        )
        .await
    }

    pub async fn unarchive(&self, ids: &[EventId]) -> Result<InboxCounts, InboxError> {
        self.change(
            InboxOp::Unarchive,
            Selection::Ids(ids.iter().map(|id| id.0).collect()),
        )
        .await
    }

    /// Applies `op` to the selected items (ids that are not this user's are ignored), then
    /// tells every stream of the user. Returns the counts after the change.
    pub async fn change(&self, op: InboxOp, selection: Selection) -> Result<InboxCounts, InboxError> {
        if let Selection::Ids(ids) = &selection {
            if ids.len() > MAX_IDS {
                return Err(InboxError::Invalid {
                    field: "ids",
                    message: format!("names {} ids, at most {MAX_IDS} at once", ids.len()),
                });
            }
            if ids.is_empty() {
                return self.counts().await;
            }
        }
        self.store.change(&self.user, op, &selection, now_ms()).await?;
        let counts = self.store.counts(&self.user).await?;
        let change = InboxChange {
            op: op.as_str().into(),
            ids: match &selection {
                Selection::Ids(ids) => ids.iter().map(u64::to_string).collect(),
                Selection::All => Vec::new(),
            },
            all: selection == Selection::All,
            unread: Some(counts.unread),
        };
        let envelope = change_envelope(Target::User(self.user.clone()), &change);
        // The change is made: a stream that misses the event still gets the counts with
        // its next page.
        if let Err(e) = self.service.publish_envelopes(vec![envelope]).await {
            match e {
                SendError::ShuttingDown => {}
                e => tracing::warn!(error = %e, "an inbox change was made but not told to the streams"),
            }
        }
        Ok(counts)
    }
}
