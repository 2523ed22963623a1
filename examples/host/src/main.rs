//! The host server: its own routes, sse-notify's routes merged in, and a send from a handler.
use axum::{extract::State, routing::post, Router};
use sse_notify::{
    events::{Notification, NotificationKind},
    server::{router, SseConfig, SseListener, SseService},
};

/// A handler of the host app that notifies a user.
async fn order_shipped(State(sse): State<SseService>) -> &'static str {
    let note = Notification {
        title: "Order shipped".into(),
        message: "It is on its way.".into(),
        kind: NotificationKind::Success,
        action_url: Some("/orders/42".into()),
    };
    match sse.send_notification("alice", note).await {
        Ok(_) => "sent",
        Err(_) => "not sent",
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sse = SseService::start(SseConfig::from_env()?).await?;
    let app: Router = Router::new()
        .route("/orders/shipped", post(order_shipped))
        .with_state(sse.clone())
        .merge(router(sse.clone()));
    // SseListener serves open streams on a lean path; plain tokio TcpListener works too.
    let listener = SseListener::bind("127.0.0.1:3100".parse()?, app.clone()).await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .await?;
    Ok(())
}
