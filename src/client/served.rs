//! Where the server mounted sse-notify's routes, handed from the server's render to the
//! page, so a host that puts them under a prefix writes it once (`Routes::prefix`).

use leptos::prelude::*;

#[cfg(not(feature = "ssr"))]
thread_local! {
    /// The prefix the page's hydration brought, for components created after it (a route
    /// reached by client-side navigation).
    static SEEN: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The prefix the server rendering this page mounted the routes under (`""` for none,
/// `"/notify"` after `Routes::new(&sse).prefix("/notify")`): read from the `SseService` in
/// the Leptos context during server rendering and handed to hydration with the page. A
/// component created later in the browser takes what hydration brought; where nothing
/// was rendered on a server (client-side rendering), `""`: such pages name their URLs.
pub(crate) fn served_prefix() -> String {
    let prefix = SharedValue::new_str(|| {
        #[cfg(feature = "ssr")]
        {
            use_context::<crate::server::SseService>()
                .map(|service| service.routes_prefix())
                .unwrap_or_else(|| {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        tracing::warn!(
                            "no SseService in the Leptos context while rendering: the toasts and \
                             the inbox assume routes at /api/...; provide it \
                             (leptos_routes_with_context) or name `url`"
                        )
                    });
                    String::new()
                })
        }
        #[cfg(not(feature = "ssr"))]
        SEEN.with_borrow(Clone::clone).unwrap_or_default()
    })
    .into_inner();
    #[cfg(not(feature = "ssr"))]
    SEEN.set(Some(prefix.clone()));
    prefix
}
