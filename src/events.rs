//! The event model shared by the server and the browser.
//!
//! Every event on the wire is `id` + `event` (its name) + `data` (one JSON object). The
//! typed payloads here serialise to exactly the wire shape of the original design: camelCase
//! fields (`reelId`, `actionUrl`, ...) and `type` for the kind enums.
//!
//! The server validates every payload before it is published ([`Event::parse`] and
//! [`Event::validate`]), so a browser can trust what it receives; the browser uses
//! [`Event::parse`] to turn a received message back into a typed value.
//!
//! ```
//! use sse_notify::events::{Event, Notification, NotificationKind};
//!
//! let event = Event::parse("notification", r#"{"title":"Hi","message":"Welcome","type":"success"}"#)
//!     .unwrap();
//! assert_eq!(
//!     event,
//!     Event::Notification(Notification {
//!         title: "Hi".into(),
//!         message: "Welcome".into(),
//!         kind: NotificationKind::Success,
//!         action_url: None,
//!     })
//! );
//! assert!(Event::parse("notification", r#"{"title":"x"}"#).is_err()); // `message` is required
//! ```

use std::fmt::Write as _;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

/// Names of the built-in events.
pub mod names {
    pub const NOTIFICATION: &str = "notification";
    pub const REEL_UPLOAD_PROGRESS: &str = "reel_upload_progress";
    pub const REEL_READY: &str = "reel_ready";
    pub const USER_UPDATE: &str = "user_update";
    pub const SYSTEM_ALERT: &str = "system_alert";
    /// Sent by the server every heartbeat interval; carries `timestamp`.
    pub const HEARTBEAT: &str = "heartbeat";
    /// Sent by the server when the `Last-Event-ID` is older than retention: some events may be missing.
    pub const RESYNC: &str = "resync";
    /// Sent to the oldest connection of a user who opened one more than the limit, before it closes.
    pub const CONNECTION_REPLACED: &str = "connection_replaced";
    /// Sent before a stream closes because its session ended: `reason` is `expired` (the
    /// token's `exp` passed) or `disconnected` (ended on purpose, e.g. at logout). The
    /// client must not reconnect with the same credentials.
    pub const SESSION_ENDED: &str = "session_ended";
    /// Sent right after a stream's replay: `{"heartbeatMs": .., "tag": ..}` (see
    /// [`api::Ready`](crate::api::Ready)). A client that sees the response open but not this
    /// event soon after knows something in between buffers it.
    pub const READY: &str = "ready";
    /// Sent when the user's inbox changed (an item added, read, unread, archived or
    /// unarchived, from any tab, device or instance): `{"op", "ids", "all", "unread"}`.
    /// Every stream gets it, whatever its `events=` filter.
    pub const INBOX: &str = "inbox";

    /// The payload events a client listens to by default.
    pub const BUILT_IN: [&str; 5] = [
        NOTIFICATION,
        REEL_UPLOAD_PROGRESS,
        REEL_READY,
        USER_UPDATE,
        SYSTEM_ALERT,
    ];
    /// Events the server sends on its own.
    pub const CONTROL: [&str; 6] = [
        HEARTBEAT,
        RESYNC,
        CONNECTION_REPLACED,
        SESSION_ENDED,
        READY,
        INBOX,
    ];
    /// Names publishers are refused: the control events, and the browser's own
    /// `EventSource` events (an `event: error` frame would fire every client's error
    /// handler and loop them all through reconnects).
    pub const RESERVED: [&str; 9] = [
        HEARTBEAT,
        RESYNC,
        CONNECTION_REPLACED,
        SESSION_ENDED,
        READY,
        INBOX,
        "error",
        "open",
        "message",
    ];
}

/// Longest accepted event name.
pub const MAX_EVENT_NAME_LEN: usize = 64;
/// Longest accepted title, reel id or other short string.
pub const MAX_SHORT_TEXT: usize = 200;
/// Longest accepted message body.
pub const MAX_MESSAGE_TEXT: usize = 2_000;
/// Longest accepted URL.
pub const MAX_URL_LEN: usize = 2_048;

/// Why an event was refused: which field, and what was wrong with it.
///
/// `field` is a path such as `data.progress` so an HTTP caller can point at the bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, its field path placed under `prefix` (e.g. `data` + `title` -> `data.title`).
    #[must_use]
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_string()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

/// Checks an event name against `[a-z0-9_.-]{1,64}`.
///
/// The rule keeps names safe on the wire: no newline or colon can reach the `event:` line.
pub fn validate_event_name(name: &str) -> Result<(), ValidationError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c);
    if name.is_empty() || name.len() > MAX_EVENT_NAME_LEN || !name.chars().all(ok_char) {
        return Err(ValidationError::new(
            "event",
            format!("must match [a-z0-9_.-]{{1,{MAX_EVENT_NAME_LEN}}}, got {name:?}"),
        ));
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize, required: bool) -> Result<(), ValidationError> {
    if required && value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(ValidationError::new(
            field,
            format!("is {chars} characters long, at most {max} allowed"),
        ));
    }
    Ok(())
}

/// Accepts `https:`, `http:` and relative URLs; refuses every other scheme (`javascript:`,
/// `data:`, ...) so a payload can never smuggle script into a link the toast renders.
pub fn validate_url(field: &str, url: &str) -> Result<(), ValidationError> {
    check_len(field, url, MAX_URL_LEN, true)?;
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            field,
            "must not contain spaces or control characters",
        ));
    }
    let lower = url.to_ascii_lowercase();
    // `//host/x`, `\\host` and `/\host` leave the site (browsers read `\` as `/`); a colon
    // before the first `/?#` is a scheme.
    let leaves_site = url.replace('\\', "/").starts_with("//");
    let has_scheme = lower
        .split(['/', '?', '#'])
        .next()
        .is_some_and(|head| head.contains(':'));
    let is_relative = !leaves_site && !has_scheme;
    if lower.starts_with("https://") || lower.starts_with("http://") || is_relative {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be an https:, http: or relative URL",
        ))
    }
}

/// Kind of a `Notification`; decides its colour and how loudly it is announced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NotificationKind {
    #[default]
    Info,
    Success,
    Warning,
    Error,
}

/// `notification`: a message for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Notification {
    pub title: String,
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: NotificationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_url: Option<String>,
}

/// Stage of a reel upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UploadStatus {
    Uploading,
    Processing,
    Ready,
    Error,
}

/// `reel_upload_progress`: how far one upload has come. Latest wins per `reel_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReelUploadProgress {
    pub reel_id: String,
    /// Percent, `0..=100`.
    pub progress: u8,
    pub status: UploadStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `reel_ready`: an upload finished and can be played.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReelReady {
    pub reel_id: String,
    pub playback_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
    /// Length of the reel in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
}

/// What part of a user changed in a `UserUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UserUpdateKind {
    Profile,
    Settings,
    Subscription,
}

/// `user_update`: the user's profile, settings or subscription changed elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserUpdate {
    #[serde(rename = "type")]
    pub kind: UserUpdateKind,
    #[serde(default)]
    pub data: Value,
}

/// Kind of a `SystemAlert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SystemAlertKind {
    #[default]
    Info,
    Warning,
    Maintenance,
}

/// `system_alert`: a message for every connected user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SystemAlert {
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: SystemAlertKind,
    /// How long to show it, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
}

/// `heartbeat`: the connection is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// Milliseconds since the Unix epoch on the server.
    pub timestamp: u64,
}

/// One event, typed by its name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    Notification(Notification),
    ReelUploadProgress(ReelUploadProgress),
    ReelReady(ReelReady),
    UserUpdate(UserUpdate),
    SystemAlert(SystemAlert),
    Heartbeat(Heartbeat),
    /// Any other valid name; `data` is a JSON object passed through as is.
    Custom {
        name: String,
        data: Value,
    },
}

impl Event {
    /// The event name it travels under.
    pub fn name(&self) -> &str {
        match self {
            Event::Notification(_) => names::NOTIFICATION,
            Event::ReelUploadProgress(_) => names::REEL_UPLOAD_PROGRESS,
            Event::ReelReady(_) => names::REEL_READY,
            Event::UserUpdate(_) => names::USER_UPDATE,
            Event::SystemAlert(_) => names::SYSTEM_ALERT,
            Event::Heartbeat(_) => names::HEARTBEAT,
            Event::Custom { name, .. } => name,
        }
    }

    /// Parses the `data` of an event received under `name` (as text, the way it arrives).
    pub fn parse(name: &str, data: &str) -> Result<Event, ValidationError> {
        let value: Value = serde_json::from_str(data)
            .map_err(|e| ValidationError::new("data", format!("is not valid JSON: {e}")))?;
        Self::from_value(name, value)
    }

    /// Builds a typed event from its name and JSON `data`, naming the bad field on failure.
    ///
    /// A `timestamp` field the server added is accepted and ignored on the typed events.
    pub fn from_value(name: &str, mut data: Value) -> Result<Event, ValidationError> {
        validate_event_name(name)?;
        let Some(object) = data.as_object_mut() else {
            return Err(ValidationError::new("data", "must be a JSON object"));
        };
        if name != names::HEARTBEAT && names::BUILT_IN.contains(&name) {
            object.remove("timestamp");
        }
        Self::read_by_name(name, data)
    }

    /// [`from_value`](Self::from_value) for `data` as JSON text, without building a `Value`
    /// tree: `None` wherever `from_value` would name an error, and also for a `timestamp`
    /// in a built-in event's data (which `from_value` drops). The publish API's fast path.
    #[cfg(feature = "ssr")]
    pub(crate) fn from_json_object(name: &str, data: &str) -> Option<Event> {
        validate_event_name(name).ok()?;
        // Only an object: a derived `Deserialize` also reads a struct from an array of its
        // fields in order (`["t", "m"]`), which `from_value` refuses.
        if !data.starts_with('{') {
            return None;
        }
        Self::read_by_name(name, JsonText(data)).ok()
    }

    /// The one table of which type each event name's data is read into.
    fn read_by_name<D: EventData>(name: &str, data: D) -> Result<Event, D::Error> {
        Ok(match name {
            names::NOTIFICATION => Event::Notification(data.read()?),
            names::REEL_UPLOAD_PROGRESS => Event::ReelUploadProgress(data.read()?),
            names::REEL_READY => Event::ReelReady(data.read()?),
            names::USER_UPDATE => Event::UserUpdate(data.read()?),
            names::SYSTEM_ALERT => Event::SystemAlert(data.read()?),
            names::HEARTBEAT => Event::Heartbeat(data.read()?),
            _ => Event::Custom {
                name: name.to_string(),
                data: data.into_value()?,
            },
        })
    }

    /// Checks the limits serde cannot express: lengths, ranges and URL schemes.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let under_data = |r: Result<(), ValidationError>| r.map_err(|e| e.under("data"));
        match self {
            Event::Notification(n) => under_data((|| {
                check_len("title", &n.title, MAX_SHORT_TEXT, true)?;
                check_len("message", &n.message, MAX_MESSAGE_TEXT, false)?;
                if let Some(url) = &n.action_url {
                    validate_url("actionUrl", url)?;
                }
                Ok(())
            })()),
            Event::ReelUploadProgress(p) => under_data((|| {
                check_len("reelId", &p.reel_id, MAX_SHORT_TEXT, true)?;
                if p.progress > 100 {
                    return Err(ValidationError::new(
                        "progress",
                        format!("must be between 0 and 100, got {}", p.progress),
                    ));
                }
                if let Some(message) = &p.message {
                    check_len("message", message, MAX_MESSAGE_TEXT, false)?;
                }
                Ok(())
            })()),
            Event::ReelReady(r) => under_data((|| {
                check_len("reelId", &r.reel_id, MAX_SHORT_TEXT, true)?;
                validate_url("playbackUrl", &r.playback_url)?;
                if let Some(url) = &r.thumbnail_url {
                    validate_url("thumbnailUrl", url)?;
                }
                match r.duration {
                    Some(d) if !(d.is_finite() && d >= 0.0) => Err(ValidationError::new(
                        "duration",
                        "must be a non-negative number of seconds",
                    )),
                    _ => Ok(()),
                }
            })()),
            Event::UserUpdate(_) => Ok(()),
            Event::Heartbeat(_) => Err(ValidationError::new(
                "event",
                "\"heartbeat\" is reserved for the server",
            )),
            Event::SystemAlert(a) => under_data(check_len("message", &a.message, MAX_MESSAGE_TEXT, true)),
            Event::Custom { name, data } => {
                validate_event_name(name)?;
                if names::RESERVED.contains(&name.as_str()) {
                    return Err(ValidationError::new(
                        "event",
                        format!("{name:?} is reserved for the server"),
                    ));
                }
                if !data.is_object() {
                    return Err(ValidationError::new("data", "must be a JSON object"));
                }
                Ok(())
            }
        }
    }

    /// The `data` JSON object of this event.
    pub fn to_data(&self) -> Value {
        match self {
            Event::Custom { data, .. } => data.clone(),
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        }
    }

    /// The `data` as one line of JSON with `"timestamp": timestamp_ms` added (a custom event
    /// that has a `timestamp` of its own keeps it), serialised once.
    ///
    /// ```
    /// use sse_notify::events::{Event, SystemAlert};
    ///
    /// let alert = Event::SystemAlert(SystemAlert { message: "m".into(), kind: Default::default(), duration: None });
    /// assert_eq!(alert.data_json_with_timestamp(7), r#"{"message":"m","type":"info","timestamp":7}"#);
    /// ```
    pub fn data_json_with_timestamp(&self, timestamp_ms: u64) -> String {
        let (mut json, has_own) = match self {
            Event::Custom { data, .. } => (data.to_string(), data.get("timestamp").is_some()),
            other => (
                serde_json::to_string(other).unwrap_or_else(|_| "{}".into()),
                false,
            ),
        };
        if !has_own && json.ends_with('}') {
            json.pop();
            if json.len() > 1 {
                json.push(',');
            }
            let _ = write!(json, "\"timestamp\":{timestamp_ms}}}");
        }
        json
    }

    /// Events of one name with the same key replace each other on replay (latest wins):
    /// the reel of a `reel_upload_progress`.
    pub fn coalesce_key(&self) -> Option<&str> {
        match self {
            Event::ReelUploadProgress(p) => Some(&p.reel_id),
            _ => None,
        }
    }
}

/// An event's `data` as one of [`Event`]'s constructors reads it: a `Value` (errors name
/// the field) or, on the publish API's fast path, JSON text (no `Value` tree built).
trait EventData {
    type Error;
    /// The data as the typed event its name calls for.
    fn read<T: DeserializeOwned>(self) -> Result<T, Self::Error>;
    /// The data of a custom event, as it is.
    fn into_value(self) -> Result<Value, Self::Error>;
}

impl EventData for Value {
    type Error = ValidationError;
    fn read<T: DeserializeOwned>(self) -> Result<T, ValidationError> {
        typed(self)
    }
    fn into_value(self) -> Result<Value, ValidationError> {
        Ok(self)
    }
}

/// Event data as JSON text.
#[cfg(feature = "ssr")]
struct JsonText<'a>(&'a str);

#[cfg(feature = "ssr")]
impl EventData for JsonText<'_> {
    type Error = serde_json::Error;
    fn read<T: DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0)
    }
    fn into_value(self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.0)
    }
}

/// Deserialises `data` into `T`, naming the offending field (`data.progress`) on failure.
#[cfg(feature = "ssr")]
fn typed<T: DeserializeOwned>(data: Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(data).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde reports a missing field at the parent path; name the field itself.
        let field = match inner.strip_prefix("missing field `") {
            Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
            None if path == "." => String::new(),
            None => path,
        };
        ValidationError::new(field, inner).under("data")
    })
}

/// In the browser the events come from the server, which validated them already: a plain
/// parse, without the path tracking that named the field (27 KB of WASM).
#[cfg(not(feature = "ssr"))]
fn typed<T: DeserializeOwned>(data: Value) -> Result<T, ValidationError> {
    serde_json::from_value(data).map_err(|e| ValidationError::new("", e.to_string()).under("data"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    proptest! {
        /// Any name: no panic; an accepted one is 1 to 64 of `[a-z0-9_.-]`.
        #[test]
        fn any_event_name_is_checked(name in ".{0,80}") {
            if validate_event_name(&name).is_ok() {
                prop_assert!(!name.is_empty() && name.len() <= 64);
                prop_assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c)));
            }
        }

        /// Any URL: no panic; an accepted one has no space or control character and does
        /// not leave the site by `//` or `\\`.
        #[test]
        fn any_url_is_checked(url in ".{0,80}") {
            if validate_url("u", &url).is_ok() {
                prop_assert!(!url.chars().any(|c| c.is_control() || c.is_whitespace()));
                let lower = url.to_ascii_lowercase();
                if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                    prop_assert!(!url.replace('\\', "/").starts_with("//"));
                }
            }
        }

        /// Any fields of any built-in event: parsing and validating never panic, and the
        /// data the server would send is one line of JSON.
        #[test]
        fn any_payload_validates_without_panic(
            name in prop::sample::select(vec!["notification", "reel_upload_progress", "reel_ready", "user_update", "system_alert", "custom.x"]),
            title in ".{0,40}",
            url in ".{0,40}",
            progress in any::<i64>(),
        ) {
            let data = json!({"title": title, "message": title, "actionUrl": url, "reelId": title,
                "progress": progress, "status": "uploading", "playbackUrl": url, "type": "info", "data": {}});
            if let Ok(event) = Event::from_value(name, data) {
                let _ = event.validate();
                let line = event.data_json_with_timestamp(1);
                prop_assert!(!line.contains('\n') && !line.contains('\r'));
                let is_object = line.starts_with('{') && line.ends_with('}');
                prop_assert!(is_object, "not one JSON object: {}", line);
            }
        }
    }

    #[test]
    fn wire_fields_are_camel_case_with_type() {
        let ready = Event::ReelReady(ReelReady {
            reel_id: "r1".into(),
            playback_url: "https://cdn/x.m3u8".into(),
            thumbnail_url: Some("/t.jpg".into()),
            duration: Some(12.5),
        });
        assert_eq!(
            ready.to_data(),
            json!({"reelId":"r1","playbackUrl":"https://cdn/x.m3u8","thumbnailUrl":"/t.jpg","duration":12.5})
        );
        let alert = Event::SystemAlert(SystemAlert {
            message: "m".into(),
            kind: SystemAlertKind::Maintenance,
            duration: None,
        });
        assert_eq!(alert.to_data(), json!({"message":"m","type":"maintenance"}));
    }

    #[test]
    fn notification_kind_defaults_to_info() {
        let e = Event::parse("notification", r#"{"title":"t","message":"m"}"#).unwrap();
        assert!(matches!(
            e,
            Event::Notification(Notification {
                kind: NotificationKind::Info,
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        let err = Event::from_value(
            "reel_upload_progress",
            json!({"reelId":"r","progress":101,"status":"uploading"}),
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert_eq!(err.field, "data.progress");
        let err = Event::from_value(
            "reel_upload_progress",
            json!({"reelId":"r","progress":"x","status":"uploading"}),
        )
        .unwrap_err();
        assert_eq!(err.field, "data.progress");
        let err = Event::from_value("notification", json!({"message":"m"})).unwrap_err();
        assert_eq!(err.field, "data.title");
        let err =
            Event::from_value("notification", json!({"title":"t","message":"m","type":"loud"})).unwrap_err();
        assert_eq!(err.field, "data.type");
    }

    #[test]
    fn urls_must_be_http_or_relative() {
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,x",
            "//evil.com/x",
            "/\\evil.example/x",
            "\\\\evil.example",
            "\\/evil.example",
            "https://a b",
        ] {
            assert!(validate_url("u", bad).is_err(), "{bad} accepted");
        }
        for good in [
            "https://example.com/a?b=c",
            "http://localhost:3000/x",
            "/reels/1",
            "reels/1",
            "/a?t=1:2",
        ] {
            assert!(validate_url("u", good).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn event_names_are_restricted() {
        for bad in ["", "Notification", "a b", "a\nb", "a:b", &"x".repeat(65)] {
            assert!(validate_event_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "order.shipped", "job-42_done", &"x".repeat(64)] {
            assert!(validate_event_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn reserved_and_non_object_custom_events_are_refused() {
        let e = Event::from_value("heartbeat", json!({"timestamp": 1})).unwrap();
        assert!(matches!(e, Event::Heartbeat(_)));
        assert_eq!(e.validate().unwrap_err().field, "event");
        for name in [
            "resync",
            "connection_replaced",
            "session_ended",
            "error",
            "open",
            "message",
        ] {
            let custom = Event::Custom {
                name: name.into(),
                data: json!({}),
            };
            assert_eq!(custom.validate().unwrap_err().field, "event", "{name}");
        }
        assert_eq!(
            Event::from_value("my.event", json!([1])).unwrap_err().field,
            "data"
        );
    }

    #[test]
    fn server_timestamp_is_accepted_by_the_browser_parser() {
        let e = Event::parse("notification", r#"{"title":"t","message":"m","timestamp":17}"#);
        assert!(e.is_ok(), "{e:?}");
    }
}
