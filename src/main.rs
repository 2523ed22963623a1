//! The `sse-notify` binary: configuration from the environment -> service -> router -> serve.
//!
//! Without `SSE_DEMO=1` it is a standalone notification server: the SSE routes, a short
//! status page at `/`, stats and metrics behind the publish key, and no sign-in. With it,
//! the demo app: sign in as anyone, send yourself events, watch the dashboard.

/// jemalloc instead of glibc's malloc: the S3 profile spent a quarter of the server's CPU
/// in glibc (`_int_malloc`, `malloc_consolidate`) on the publish path's short-lived buffers.
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "ssr")]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::process::ExitCode;

    use sse_notify::server::{SseConfig, SseListener, SseService};
    use tracing_subscriber::EnvFilter;

    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

    let demo = match std::env::var("SSE_DEMO").as_deref() {
        Err(_) | Ok("" | "0") => false,
        Ok("1") => true,
        Ok(other) => {
            eprintln!("sse-notify: SSE_DEMO={other:?} is not valid: expected 1 (the demo) or unset");
            return ExitCode::from(2);
        }
    };
    let config = match SseConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sse-notify: {e}");
            return ExitCode::from(2);
        }
    };
    let options = match leptos::config::get_configuration(None) {
        Ok(conf) => conf.leptos_options,
        Err(e) => {
            eprintln!("sse-notify: bad LEPTOS_* configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = options.site_addr;
    let service = match SseService::start(config).await {
        Ok(service) => service,
        Err(e) => {
            eprintln!("sse-notify: {e}");
            return ExitCode::from(1);
        }
    };
    let app = if demo {
        tracing::warn!("SSE_DEMO=1: anyone can sign in as anyone; never run this in production");
        sse_notify::app::router(options, service.clone())
    } else {
        standalone::router(&service)
    };
    let listener = match SseListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sse-notify: cannot listen on {addr} (LEPTOS_SITE_ADDR): {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(demo, "listening on http://{addr}");
    match listener
        .serve(app, &service)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse-notify: server error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The standalone server's routes: everything the notification server offers, and a status
/// page at `/`.
#[cfg(feature = "ssr")]
mod standalone {
    use axum::{response::Html, routing::get, Router};
    use sse_notify::server::{Routes, SseService};

    pub fn router(service: &SseService) -> Router {
        let service_for_page = service.clone();
        Router::new()
            .route(
                "/",
                get(move || {
                    let service = service_for_page.clone();
                    async move { Html(status_page(&service)) }
                }),
            )
            .merge(Routes::new(service).dashboard(true).build())
    }

    fn status_page(service: &SseService) -> String {
        format!(
            r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sse-notify</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; line-height: 1.5">
<h1>sse-notify</h1>
<p>A notification server is running here ({broker} broker, {health:?}).</p>
<p>Browsers stream events from <code>GET {stream}</code> with a session token; other backends publish with
<code>POST /api/events</code> and the publish key. Stats and metrics need the publish key too.</p>
<p>Operators: <a href="/dashboard">the dashboard</a> of every instance (sign in with the publish key).</p>
</body></html>"#,
            broker = service.broker_kind(),
            health = service.broker_health(),
            stream = service.stream_path(),
        )
    }
}

/// Waits for ctrl-c or SIGTERM; the server then stops accepting, ends every stream (so
/// clients reconnect elsewhere) and finishes the requests in flight.
#[cfg(feature = "ssr")]
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(not(feature = "ssr"))]
fn main() {}
