//! What travels between the service, the broker and the hub: events with their target, and
//! once published, their id and their SSE frame. This module sits below both the broker and
//! the hub, so neither needs the other.

use std::{fmt, fmt::Write as _, str::FromStr, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};

/// The id of a published event: increasing (per lane on a cluster). As a client's
/// `Last-Event-ID` it stands for a [`Cursor`].
///
/// Ids come from one counter per broker (one per Redis for the Redis broker), so a user's
/// events and broadcasts share one order and one id resumes both exactly; on a Redis
/// Cluster, from one counter per lane (see [`Cursor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EventId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(EventId)
    }
}

impl serde::Serialize for EventId {
    /// As a string: ids may pass 2^53, past what a JavaScript number holds exactly.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a client stands in the event order: what `Last-Event-ID` carries, and where a
/// stream resumes.
///
/// With one order for every event (the in-process broker, one Redis) it is one id. On a
/// Redis Cluster a user's events and broadcasts are ordered on different shards, each in
/// its own lane, so it holds one position per lane and reads `<user lane>.<broadcast lane>`:
/// a resume is exact in both, however the two lanes interleaved on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// One order for all events.
    One(EventId),
    /// The user's lane and the broadcast lane.
    Lanes { user: EventId, broadcast: EventId },
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::One(EventId(0))
    }
}

impl Cursor {
    /// The start of both lanes.
    pub const LANES_START: Cursor = Cursor::Lanes {
        user: EventId(0),
        broadcast: EventId(0),
    };

    /// The position in the user's lane and in the broadcast lane (the same id for one order).
    pub fn lanes(self) -> (EventId, EventId) {
        match self {
            Cursor::One(id) => (id, id),
            Cursor::Lanes { user, broadcast } => (user, broadcast),
        }
    }

    /// Whether `event` is at or before this position in its lane: already sent.
    pub fn covers(self, event: &PublishedEvent) -> bool {
        match self {
            Cursor::One(id) => event.id <= id,
            Cursor::Lanes { user, broadcast } => match event.target {
                Target::User(_) => event.id <= user,
                Target::Broadcast => event.id <= broadcast,
            },
        }
    }

    /// Moves past `event` in its lane (never back).
    pub fn advance(&mut self, event: &PublishedEvent) {
        match self {
            Cursor::One(id) => *id = (*id).max(event.id),
            Cursor::Lanes { user, broadcast } => {
                let lane = match event.target {
                    Target::User(_) => user,
                    Target::Broadcast => broadcast,
                };
                *lane = (*lane).max(event.id);
            }
        }
    }

    /// The earlier of its lanes, as one id: where a broker with one order resumes it.
    pub fn earliest(self) -> EventId {
        let (user, broadcast) = self.lanes();
        user.min(broadcast)
    }

    /// Each lane through `f`; stays one id when it is one.
    pub fn map(self, f: impl Fn(EventId) -> EventId) -> Self {
        match self {
            Cursor::One(id) => Cursor::One(f(id)),
            Cursor::Lanes { user, broadcast } => Cursor::Lanes {
                user: f(user),
                broadcast: f(broadcast),
            },
        }
    }

    /// Lane by lane, with `other`; lanes when either has them.
    pub fn zip(self, other: Self, f: impl Fn(EventId, EventId) -> EventId) -> Self {
        match (self, other) {
            (Cursor::One(a), Cursor::One(b)) => Cursor::One(f(a, b)),
            _ => {
                let ((au, ab), (bu, bb)) = (self.lanes(), other.lanes());
                Cursor::Lanes {
                    user: f(au, bu),
                    broadcast: f(ab, bb),
                }
            }
        }
    }

    /// The later position in each lane.
    pub fn max(self, other: Self) -> Self {
        self.zip(other, EventId::max)
    }

    /// The earlier position in each lane.
    pub fn min(self, other: Self) -> Self {
        self.zip(other, EventId::min)
    }

    /// Nothing in any lane yet.
    pub fn is_start(self) -> bool {
        self.lanes() == (EventId(0), EventId(0))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cursor::One(id) => id.fmt(f),
            Cursor::Lanes { user, broadcast } => write!(f, "{user}.{broadcast}"),
        }
    }
}

impl FromStr for Cursor {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('.') {
            None => Ok(Cursor::One(EventId(s.parse()?))),
            Some((user, broadcast)) => Ok(Cursor::Lanes {
                user: EventId(user.parse()?),
                broadcast: EventId(broadcast.parse()?),
            }),
        }
    }
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    User(Arc<str>),
    /// Every connected user.
    Broadcast,
}

/// A validated event on its way to the broker.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub target: Target,
    pub name: Arc<str>,
    /// The `data` object as one line of JSON, `timestamp` included.
    pub data: String,
    /// The `timestamp` in `data`: when the service accepted it, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Events of one name and key replace each other on replay (latest wins): the reel of a
    /// `reel_upload_progress`. Set when the event is built, so no one parses `data` again.
    pub coalesce_key: Option<Arc<str>>,
}

/// An event with its id, encoded once as an SSE frame that every connection shares.
#[derive(Debug)]
pub struct PublishedEvent {
    pub id: EventId,
    pub target: Target,
    pub name: Arc<str>,
    /// When it was accepted, ms since the Unix epoch; drives retention.
    pub published_at_ms: u64,
    /// See [`Envelope::coalesce_key`].
    pub coalesce_key: Option<Arc<str>>,
    /// `id: ..\nevent: ..\ndata: ..\n\n`, ready to write to any connection.
    pub frame: Bytes,
    /// The `data` JSON, a view into `frame`.
    pub data: Bytes,
}

impl PublishedEvent {
    pub fn new(id: EventId, envelope: Envelope) -> Self {
        Self::encode(
            id,
            envelope.target,
            envelope.name,
            &envelope.data,
            envelope.timestamp_ms,
            envelope.coalesce_key,
        )
    }

    /// An event from its parts, `data` copied once, into the frame.
    pub fn encode(
        id: EventId,
        target: Target,
        name: Arc<str>,
        data: &str,
        published_at_ms: u64,
        coalesce_key: Option<Arc<str>>,
    ) -> Self {
        let frame = encode_event_frame(Some(id), &name, data);
        Self::framed(frame, id, target, name, published_at_ms, coalesce_key)
    }

    /// An event of a lane (see [`Cursor::Lanes`]): its frame has no `id:` line, since the
    /// id a client needs is its cursor in both lanes, which each connection writes itself.
    pub fn encode_in_lane(
        id: EventId,
        target: Target,
        name: Arc<str>,
        data: &str,
        published_at_ms: u64,
        coalesce_key: Option<Arc<str>>,
    ) -> Self {
        let frame = encode_event_frame(None, &name, data);
        Self::framed(frame, id, target, name, published_at_ms, coalesce_key)
    }

    fn framed(
        (frame, data): (Bytes, Bytes),
        id: EventId,
        target: Target,
        name: Arc<str>,
        published_at_ms: u64,
        coalesce_key: Option<Arc<str>>,
    ) -> Self {
        Self {
            id,
            target,
            name,
            published_at_ms,
            coalesce_key,
            frame,
            data,
        }
    }

    /// The `data` JSON as text.
    pub fn data_str(&self) -> &str {
        std::str::from_utf8(&self.data).unwrap_or("{}")
    }
}

/// Encodes one SSE frame without an id (control events: heartbeat, resync, ...). `name` must
/// be a validated event name and `data` one line of JSON (serde_json never emits a raw
/// newline), so no payload can forge a field.
pub fn encode_frame(name: &str, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(name.len() + data.len() + 18);
    put_name_and_data(&mut buf, name, data);
    buf.freeze()
}

/// The `id:` line that puts a client at `cursor`: written before each event of a lane.
pub fn id_line(cursor: Cursor) -> Bytes {
    let mut buf = BytesMut::with_capacity(48);
    let _ = writeln!(buf, "id: {cursor}");
    buf.freeze()
}

/// Encodes an event's frame (with its `id:` line, or none in a lane); returns it and the
/// view of its `data`.
fn encode_event_frame(id: Option<EventId>, name: &str, data: &str) -> (Bytes, Bytes) {
    let mut buf = BytesMut::with_capacity(name.len() + data.len() + 40);
    // `BytesMut` is a `fmt::Write`: the id goes in without a `String` of its own.
    if let Some(id) = id {
        let _ = writeln!(buf, "id: {}", id.0);
    }
    let data_at = buf.len() + "event: ".len() + name.len() + "\ndata: ".len();
    put_name_and_data(&mut buf, name, data);
    let frame = buf.freeze();
    let data = frame.slice(data_at..data_at + data.len());
    (frame, data)
}

fn put_name_and_data(buf: &mut BytesMut, name: &str, data: &str) {
    debug_assert!(!name.contains(['\n', '\r']) && !data.contains(['\n', '\r']));
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\ndata: ");
    buf.put_slice(data.as_bytes());
    buf.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, as publishers may send in `data`.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(Into::into),
            any::<i64>().prop_map(Into::into),
            ".*".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the data, an event is exactly one SSE frame: one `id:`, one `event:`,
        /// one `data:` line, then the blank line; no payload can forge a field or a second
        /// event.
        #[test]
        fn any_data_makes_exactly_one_frame(
            name in "[a-z0-9_.-]{1,64}",
            data in json(),
            id in any::<u64>(),
        ) {
            let envelope = Envelope {
                target: Target::Broadcast,
                name: name.as_str().into(),
                data: data.to_string(),
                timestamp_ms: 0,
                coalesce_key: None,
            };
            let event = PublishedEvent::new(EventId(id), envelope);
            let text = std::str::from_utf8(&event.frame).unwrap();
            prop_assert!(text.ends_with("\n\n"));
            let lines: Vec<&str> = text[..text.len() - 2].split('\n').collect();
            prop_assert_eq!(lines.len(), 3, "{:?}", text);
            prop_assert_eq!(lines[0], format!("id: {id}"));
            prop_assert_eq!(lines[1], format!("event: {name}"));
            prop_assert_eq!(lines[2], format!("data: {data}"));
            prop_assert!(!text.contains('\r'));
        }
    }

    #[test]
    fn an_event_is_one_sse_frame_and_its_data_a_view_into_it() {
        let envelope = Envelope {
            target: Target::Broadcast,
            name: "notification".into(),
            data: r#"{"title":"a\nb"}"#.into(),
            timestamp_ms: 7,
            coalesce_key: None,
        };
        let event = PublishedEvent::new(EventId(42), envelope);
        assert_eq!(
            &event.frame[..],
            b"id: 42\nevent: notification\ndata: {\"title\":\"a\\nb\"}\n\n"
        );
        assert_eq!(event.data_str(), r#"{"title":"a\nb"}"#);
        assert_eq!(event.published_at_ms, 7);
        assert_eq!(
            &encode_frame("heartbeat", "{}")[..],
            b"event: heartbeat\ndata: {}\n\n"
        );
    }
}
