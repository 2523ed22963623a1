//! The notification center over HTTP, for the signed-in user (the same session as the
//! stream: token, cookie, or the host's `Authenticate` hook):
//! - `GET /api/inbox?status=unread|all|archived&before=<cursor>&limit=<1..100>`: a page,
//!   newest first, with the `unread` and `total` counts and the `next` cursor;
//! - `POST /api/inbox/read`, `/unread`, `/archive`, `/unarchive` with `{"ids": [...]}` or
//!   `{"all": true}`: the counts after the change. Ids that are not the user's are ignored,
//!   so the answer says nothing about other users' items.
//!
//! With a cookie session a page on another site is refused (as for the stream), so no
//! other site can read a user's inbox or change it with their cookie.

use axum::{
    body::Body,
    extract::{Query, Request, State},
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;

use super::{
    admission::{check_cookie_origin, identify},
    publish::BODY_TIMEOUT,
    ApiError,
};
use crate::{
    api::InboxSelection,
    server::{
        core::{inbox::UserInbox, service::SseService},
        inbox::{InboxCursor, InboxError, InboxOp, InboxQuery, InboxStatus, Selection, MAX_IDS, MAX_PAGE},
    },
};

/// The most a change's body may hold: a thousand ids and then some.
const MAX_BODY: usize = 64 * 1024;

impl From<InboxError> for ApiError {
    fn from(e: InboxError) -> Self {
        match e {
            InboxError::Off => ApiError::new(StatusCode::NOT_FOUND, e.to_string()).field("SSE_INBOX_URL"),
            InboxError::Invalid { field, .. } => ApiError::bad_request(e.to_string()).field(field),
            InboxError::Store(_) => {
                tracing::warn!(error = %e, "inbox request failed");
                ApiError::unavailable(e.to_string()).field("inbox")
            }
        }
    }
}

/// The signed-in user's inbox, after the origin rule and the session check.
async fn user_inbox(service: &SseService, parts: Parts) -> Result<UserInbox, ApiError> {
    if !service.has_inbox() {
        return Err(InboxError::Off.into());
    }
    check_cookie_origin(service, &parts)?;
    let identity = identify(service, parts).await?;
    Ok(service.inbox(&identity.user_id)?)
}

/// The query of `GET /api/inbox`, as it comes.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    status: Option<String>,
    before: Option<String>,
    limit: Option<String>,
    /// The session token, read by the default `Auth` (accepted here so it is not refused
    /// as unknown).
    #[allow(dead_code)]
    token: Option<String>,
}

fn parse_list_query(raw: ListQuery) -> Result<InboxQuery, ApiError> {
    let status = match raw.status.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => InboxStatus::All,
        Some(s) => InboxStatus::parse(s)
            .ok_or_else(|| ApiError::bad_request("expected unread, all or archived").field("status"))?,
    };
    let before =
        match raw.before.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(InboxCursor::parse(s).ok_or_else(|| {
                ApiError::bad_request("expected the `next` of a page before").field("before")
            })?),
        };
    let limit = match raw.limit.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => 0,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::bad_request(format!("expected 1 to {MAX_PAGE}")).field("limit")),
        },
    };
    Ok(InboxQuery {
        status,
        before,
        limit,
    })
}

/// `GET /api/inbox`.
pub async fn list_handler(State(service): State<SseService>, request: Request) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let Query(raw) = Query::<ListQuery>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::bad_request(e.body_text()).field("query"))?;
    let query = parse_list_query(raw)?;
    let inbox = user_inbox(&service, parts).await?;
    Ok(Json(inbox.list(&query).await?).into_response())
}

/// The ids and `all` of a change's body, checked: 400 naming the field otherwise.
async fn read_selection(body: Body) -> Result<Selection, ApiError> {
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => {
            return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the body came too slowly").field("body"))
        }
        Ok(Err(_)) => {
            let too_large = format!("body is larger than {MAX_BODY} bytes");
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, too_large).field("body"));
        }
        Ok(Ok(bytes)) => bytes,
    };
    let selection: InboxSelection = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!("expected {{\"ids\": [...]}} or {{\"all\": true}}: {e}")).field("body")
    })?;
    match (selection.all, selection.ids.is_empty()) {
        (true, false) => Err(ApiError::bad_request("give ids or all, not both").field("all")),
        (true, true) => Ok(Selection::All),
        (false, true) => {
            Err(ApiError::bad_request("expected at least one id, or \"all\": true").field("ids"))
        }
        (false, false) => {
            if selection.ids.len() > MAX_IDS {
                return Err(ApiError::bad_request(format!("at most {MAX_IDS} ids at once")).field("ids"));
            }
            let ids = selection
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    id.trim().parse::<u64>().map_err(|_| {
                        ApiError::bad_request(format!("{id:?} is not an event id")).field(format!("ids[{i}]"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Selection::Ids(ids))
        }
    }
}

/// `POST /api/inbox/<op>`: applies `op` and answers the counts after it.
async fn change(service: SseService, request: Request, op: InboxOp) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let inbox = user_inbox(&service, parts).await?;
    let selection = read_selection(body).await?;
    let counts = inbox.change(op, selection).await?;
    Ok(Json(counts).into_response())
}

/// `POST /api/inbox/read`.
pub async fn read_handler(State(service): State<SseService>, request: Request) -> Result<Response, ApiError> {
    change(service, request, InboxOp::Read).await
}

/// `POST /api/inbox/unread`.
pub async fn unread_handler(
    State(service): State<SseService>,
    request: Request,
) -> Result<Response, ApiError> {
    change(service, request, InboxOp::Unread).await
}

/// `POST /api/inbox/archive`.
pub async fn archive_handler(
    State(service): State<SseService>,
    request: Request,
) -> Result<Response, ApiError> {
    change(service, request, InboxOp::Archive).await
}

/// `POST /api/inbox/unarchive`.
pub async fn unarchive_handler(
    State(service): State<SseService>,
    request: Request,
) -> Result<Response, ApiError> {
    change(service, request, InboxOp::Unarchive).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(
        status: Option<&str>,
        before: Option<&str>,
        limit: Option<&str>,
    ) -> Result<InboxQuery, ApiError> {
        parse_list_query(ListQuery {
            status: status.map(Into::into),
            before: before.map(Into::into),
            limit: limit.map(Into::into),
            token: None,
        })
    }

    #[test]
    fn list_queries_are_checked_field_by_field() {
        assert_eq!(query(None, None, None).unwrap(), InboxQuery::default());
        let q = query(Some("unread"), Some("1700000000000.42"), Some("100")).unwrap();
        assert_eq!(q.status, InboxStatus::Unread);
        assert_eq!(
            q.before,
            Some(InboxCursor {
                created_ms: 1_700_000_000_000,
                id: 42
            })
        );
        assert_eq!(q.limit, 100);
        for (bad, field) in [
            (query(Some("new"), None, None), "status"),
            (query(None, Some("42"), None), "before"),
            (query(None, None, Some("0")), "limit"),
            (query(None, None, Some("101")), "limit"),
            (query(None, None, Some("x")), "limit"),
        ] {
            assert_eq!(bad.unwrap_err().field.as_deref(), Some(field));
        }
    }

    #[tokio::test]
    async fn change_bodies_are_checked_field_by_field() {
        let read = |body: &'static str| read_selection(Body::from(body));
        assert_eq!(
            read(r#"{"ids":["1","2"]}"#).await.unwrap(),
            Selection::Ids(vec![1, 2])
        );
        assert_eq!(read(r#"{"all":true}"#).await.unwrap(), Selection::All);
        for (body, field) in [
            ("not json", "body"),
            (r#"{"ids":[]}"#, "ids"),
            (r#"{"ids":["1"],"all":true}"#, "all"),
            (r#"{"ids":["1","x"]}"#, "ids[1]"),
            (r#"{"ids":"1"}"#, "body"),
        ] {
            assert_eq!(
                read(body).await.unwrap_err().field.as_deref(),
                Some(field),
                "{body}"
            );
        }
        let many = format!(r#"{{"ids":[{}]}}"#, vec!["\"1\""; MAX_IDS + 1].join(","));
        assert_eq!(
            read_selection(Body::from(many))
                .await
                .unwrap_err()
                .field
                .as_deref(),
            Some("ids")
        );
    }
}
