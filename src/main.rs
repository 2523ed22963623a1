//! The demo server: configuration from the environment -> service -> router -> serve.

#[cfg(feature = "ssr")]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    use std::{net::SocketAddr, process::ExitCode};

    use sse_notify::server::{SseConfig, SseListener, SseService};
    use tracing_subscriber::EnvFilter;

    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

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
    let app = sse_notify::app::router(options, service.clone());
    let listener = match SseListener::bind(addr, app.clone()).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sse-notify: cannot listen on {addr} (LEPTOS_SITE_ADDR): {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!("listening on http://{addr}");
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown_signal(service))
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sse-notify: server error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Waits for ctrl-c or SIGTERM, then ends every stream so clients reconnect elsewhere and
/// the graceful shutdown does not wait on streams that never end by themselves.
#[cfg(feature = "ssr")]
async fn shutdown_signal(service: sse_notify::server::SseService) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
    service.shutdown().await;
}

#[cfg(not(feature = "ssr"))]
fn main() {}
