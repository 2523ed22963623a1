//! What the browser knows of the inbox, and how pages, the stream's `inbox` events and the
//! user's own clicks change it: plain Rust, unit-tested on the host.

use crate::api::{InboxChange, InboxItem, InboxPage};

/// The inbox as this tab shows it: the items loaded so far (not archived, newest first)
/// and the counts of the whole of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InboxState {
    pub items: Vec<InboxItem>,
    pub unread: u64,
    pub total: u64,
    /// The cursor of the next page; `None` once the last is loaded.
    pub next: Option<String>,
    /// The first page came (from the server's render or a fetch).
    pub loaded: bool,
    pub loading: bool,
    /// The last request's failure, until one succeeds.
    pub error: Option<String>,
    /// Items were added that this tab has not loaded: fetch the first page again when
    /// it is next shown.
    pub stale: bool,
}

/// A change the user makes, applied at once (the server's answer and `inbox` event agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalChange {
    Read,
    Unread,
    Archive,
}

impl InboxState {
    /// The state of a first page.
    pub fn from_page(page: InboxPage) -> Self {
        Self {
            items: page.items,
            unread: page.unread,
            total: page.total,
            next: page.next,
            loaded: true,
            ..Self::default()
        }
    }

    /// A fresh first page replaces what was loaded.
    pub fn first_page(&mut self, page: InboxPage) {
        *self = Self::from_page(page);
    }

    /// The next page goes after the items loaded (an item already there is not repeated).
    pub fn more(&mut self, page: InboxPage) {
        for item in page.items {
            if !self.items.iter().any(|i| i.id == item.id) {
                self.items.push(item);
            }
        }
        self.unread = page.unread;
        self.total = page.total;
        self.next = page.next;
        self.loading = false;
        self.error = None;
    }

    /// Whether there are older items to load.
    pub fn has_more(&self) -> bool {
        self.next.is_some()
    }

    /// An `inbox` event from the stream: another tab, device or instance changed it.
    pub fn apply(&mut self, change: &InboxChange, now_ms: u64) {
        let selected = |item: &InboxItem| change.all || change.ids.contains(&item.id);
        match change.op.as_str() {
            "added" => {
                let new = change
                    .ids
                    .iter()
                    .filter(|id| !self.items.iter().any(|i| i.id == **id))
                    .count() as u64;
                self.total += new;
                self.unread += new;
                self.stale |= new > 0;
            }
            "read" => self.items.iter_mut().filter(|i| selected(i)).for_each(|i| {
                i.read.get_or_insert(now_ms);
            }),
            "unread" => self
                .items
                .iter_mut()
                .filter(|i| selected(i))
                .for_each(|i| i.read = None),
            "archived" => self.items.retain(|i| !selected(i)),
            // Back from the archive: which page it belongs on is the server's to say.
            "unarchived" => self.stale = true,
            _ => {}
        }
        if let Some(unread) = change.unread {
            self.unread = unread;
        }
        if change.op == "archived" || change.op == "unarchived" {
            // The total moves by how many were archived, which only the server knows.
            self.stale = true;
        }
    }

    /// The user's own change, shown before the server answers.
    pub fn change_locally(&mut self, change: LocalChange, ids: &[String], all: bool, now_ms: u64) {
        let selected = |item: &InboxItem| all || ids.contains(&item.id);
        match change {
            LocalChange::Read => {
                let mut newly = 0;
                for item in self.items.iter_mut().filter(|i| selected(i) && i.read.is_none()) {
                    item.read = Some(now_ms);
                    newly += 1;
                }
                self.unread = if all { 0 } else { self.unread.saturating_sub(newly) };
            }
            LocalChange::Unread => {
                for item in self.items.iter_mut().filter(|i| selected(i) && i.read.is_some()) {
                    item.read = None;
                    self.unread += 1;
                }
            }
            LocalChange::Archive => {
                let before = self.items.len();
                let unread_gone = self
                    .items
                    .iter()
                    .filter(|i| selected(i) && i.read.is_none())
                    .count() as u64;
                self.items.retain(|i| !selected(i));
                self.total = self.total.saturating_sub((before - self.items.len()) as u64);
                self.unread = self.unread.saturating_sub(unread_gone);
            }
        }
    }

    /// The counts the server answered a change with.
    pub fn counts(&mut self, unread: u64, total: u64) {
        self.unread = unread;
        self.total = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, read: bool) -> InboxItem {
        InboxItem {
            id: id.into(),
            event: "notification".into(),
            data: serde_json::json!({"title": id, "message": "m"}),
            created: 1,
            read: read.then_some(5),
            archived: None,
        }
    }

    fn page(items: Vec<InboxItem>, unread: u64, total: u64, next: Option<&str>) -> InboxPage {
        InboxPage {
            items,
            unread,
            total,
            next: next.map(Into::into),
        }
    }

    fn change(op: &str, ids: &[&str], all: bool, unread: Option<u64>) -> InboxChange {
        InboxChange {
            op: op.into(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            all,
            unread,
        }
    }

    #[test]
    fn pages_load_in_order_without_repeats() {
        let mut state = InboxState::from_page(page(vec![item("3", false), item("2", true)], 2, 3, Some("c")));
        assert!(state.loaded && state.has_more());
        state.more(page(vec![item("2", true), item("1", false)], 2, 3, None));
        let ids: Vec<_> = state.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["3", "2", "1"]);
        assert!(!state.has_more());
    }

    #[test]
    fn changes_from_other_tabs_apply_with_the_servers_count() {
        let mut state = InboxState::from_page(page(vec![item("3", false), item("2", false)], 2, 2, None));
        state.apply(&change("read", &["3"], false, Some(1)), 9);
        assert_eq!((state.items[0].read, state.unread), (Some(9), 1));
        state.apply(&change("unread", &[], true, Some(2)), 9);
        assert!(state.items.iter().all(|i| i.read.is_none()));
        assert_eq!(state.unread, 2);
        state.apply(&change("archived", &["2"], false, Some(1)), 9);
        assert_eq!(state.items.len(), 1);
        assert!(state.stale, "the total is the server's to say");
    }

    #[test]
    fn an_added_item_counts_at_once_and_asks_for_the_first_page_again() {
        let mut state = InboxState::from_page(page(vec![item("3", false)], 1, 1, None));
        // A broadcast: no count, everyone's went up by one.
        state.apply(&change("added", &["4"], false, None), 9);
        assert_eq!((state.unread, state.total, state.stale), (2, 2, true));
        // Known already (the page that loaded it raced the event): not counted twice.
        let mut state = InboxState::from_page(page(vec![item("4", false)], 1, 1, None));
        state.apply(&change("added", &["4"], false, None), 9);
        assert_eq!((state.unread, state.stale), (1, false));
    }

    #[test]
    fn the_users_own_changes_show_at_once() {
        let mut state = InboxState::from_page(page(
            vec![item("3", false), item("2", false), item("1", true)],
            2,
            3,
            None,
        ));
        state.change_locally(LocalChange::Read, &["3".into()], false, 7);
        assert_eq!((state.items[0].read, state.unread), (Some(7), 1));
        state.change_locally(LocalChange::Read, &["3".into()], false, 8);
        assert_eq!(state.unread, 1, "reading twice counts once");
        state.change_locally(LocalChange::Archive, &["2".into()], false, 9);
        assert_eq!((state.items.len(), state.unread, state.total), (2, 0, 2));
        state.change_locally(LocalChange::Unread, &["1".into()], false, 9);
        assert_eq!(state.unread, 1);
        state.change_locally(LocalChange::Read, &[], true, 10);
        assert_eq!(state.unread, 0);
        assert!(state.items.iter().all(|i| i.read.is_some()));
    }
}
