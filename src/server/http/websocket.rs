//! `GET /api/ws`: the same stream over WebSocket, for when something in between (a proxy,
//! a CDN, a corporate middlebox) buffers `text/event-stream` responses.
//!
//! Everything is the stream's: the same session check, rates, `events=` filter, resume by
//! `lastEventId=`, the same hub (per-user limit, bounded queue, slow-client cut-off) and
//! the same ids. Each message is text holding one or more SSE frames exactly as the stream
//! writes them (`id:`, `event:`, `data:` lines and a blank line), so the browser parses
//! both transports alike and a client can switch in either direction by last id without
//! loss or duplicates. Heartbeats go as frames too (the page sees them) and as WebSocket
//! pings (so proxies see traffic).

use std::time::Duration;

use axum::{
    extract::{
        ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade},
        FromRequestParts, Request, State,
    },
    response::Response,
};
use futures::StreamExt;

use super::{
    admission::{admit, Transport},
    ApiError,
};
use crate::{
    events::names,
    server::core::{connection::EventStream, service::SseService},
};

/// A send that makes no progress for this long means the client stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients have nothing to say but close and pong: anything bigger is refused.
const MAX_INCOMING_MESSAGE: usize = 1024;
/// What one read from the socket may take at once.
const READ_BUFFER: usize = 2048;

/// `GET /api/ws`.
pub async fn ws_handler(State(service): State<SseService>, request: Request) -> Result<Response, ApiError> {
    let (mut parts, _) = request.into_parts();
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()).field("upgrade"))?;
    #[cfg(unix)]
    let connection = parts
        .extensions
        .get::<super::listener::RequestConnection>()
        .cloned();
    let admitted = admit(&service, parts, Transport::WebSocket).await?;
    let stream = service
        .open_stream(&admitted.identity, admitted.resume, admitted.filter)
        .await?;
    // Streams have limits of their own: the connection leaves its address's budget of
    // request connections.
    #[cfg(unix)]
    if let Some(connection) = connection {
        connection.became_stream();
    }
    // tungstenite's defaults are 128 KiB read and write buffers per socket (137 KiB RSS
    // per idle connection in S1 over WebSocket); clients only send pongs and close, and
    // each frame is flushed as it is sent, so small buffers lose nothing.
    Ok(upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(MAX_INCOMING_MESSAGE)
        .max_frame_size(MAX_INCOMING_MESSAGE)
        .on_upgrade(move |socket| pump(socket, stream)))
}

/// Sends the stream's frames until either side ends.
async fn pump(mut socket: WebSocket, mut stream: EventStream) {
    loop {
        tokio::select! {
            next = stream.next() => {
                let Some(Ok(bytes)) = next else {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(Message::Close(None))).await;
                    return;
                };
                let heartbeat = bytes
                    .strip_prefix(b"event: ")
                    .is_some_and(|rest| rest.starts_with(names::HEARTBEAT.as_bytes()));
                let Ok(text) = Utf8Bytes::try_from(bytes) else { return };
                if !send(&mut socket, Message::Text(text)).await {
                    return;
                }
                if heartbeat && !send(&mut socket, Message::Ping(Default::default())).await {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn send(socket: &mut WebSocket, message: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await,
        Ok(Ok(()))
    )
}
