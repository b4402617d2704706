//! [`Router`]: method and path patterns to async handlers, on the matchit crate (the router
//! axum uses): `/users/{id}` captures one segment, `/files/{*rest}` the rest of the path.

use std::{future::Future, pin::Pin, sync::Arc};

use crate::{Request, Response};

type BoxFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;
type Handler<S> = Arc<dyn Fn(S, Request) -> BoxFuture + Send + Sync + 'static>;

/// Routes requests by method and path to async handlers that get a clone of the state `S`
/// (often an `Arc` of the plugin's shared state) and the request, whose [`Request::param`]
/// gives the captured parameters.
///
/// ```
/// use plugin_api::{Request, Response, Router};
///
/// #[derive(Clone)]
/// struct App { greeting: &'static str }
///
/// async fn user(app: App, req: Request) -> Response {
///     Response::text(200, format!("{} user {}\n", app.greeting, req.param("id").unwrap()))
/// }
///
/// let router = Router::new(App { greeting: "hi" })
///     .get("/users/{id}", user)
///     .post("/users", |_app: App, _req: Request| async { Response::new(201) });
/// # let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let response = runtime.block_on(router.handle(Request::new("GET", "/users/7")));
/// assert_eq!(response.body(), b"hi user 7\n");
/// let response = runtime.block_on(router.handle(Request::new("DELETE", "/users")));
/// assert_eq!(response.status(), 405);
/// ```
pub struct Router<S> {
    state: S,
    paths: matchit::Router<usize>,
    /// Per path (the index `paths` gives): the handler of each method.
    methods: Vec<Vec<(String, Handler<S>)>>,
    patterns: Vec<String>,
}

impl<S: Clone + Send + Sync + 'static> Router<S> {
    /// A router with no routes (every request is a 404) and the state handlers get.
    pub fn new(state: S) -> Router<S> {
        Router {
            state,
            paths: matchit::Router::new(),
            methods: Vec::new(),
            patterns: Vec::new(),
        }
    }

    /// Routes `method` requests for `pattern` to `handler`.
    ///
    /// # Panics
    /// When the pattern is not valid or conflicts with another one (matchit's message says
    /// which), or the same method and pattern were routed before: routes are built in
    /// `on_start`, so the worker's start fails with the reason.
    pub fn route<F, Fut>(mut self, method: &str, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(S, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        let index = match self.patterns.iter().position(|p| p == pattern) {
            Some(i) => i,
            None => {
                let i = self.methods.len();
                if let Err(e) = self.paths.insert(pattern, i) {
                    panic!("route {method} {pattern} cannot be added: {e}");
                }
                self.methods.push(Vec::new());
                self.patterns.push(pattern.to_string());
                i
            }
        };
        let method = method.to_ascii_uppercase();
        assert!(
            !self.methods[index].iter().any(|(m, _)| *m == method),
            "route {method} {pattern} is defined twice"
        );
        let handler: Handler<S> = Arc::new(move |state, req| Box::pin(handler(state, req)));
        self.methods[index].push((method, handler));
        self
    }

    /// Routes `GET` (and `HEAD`) requests for `pattern`.
    pub fn get<F, Fut>(self, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(S, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.route("GET", pattern, handler)
    }

    /// Routes `POST` requests for `pattern`.
    pub fn post<F, Fut>(self, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(S, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.route("POST", pattern, handler)
    }

    /// Routes `PUT` requests for `pattern`.
    pub fn put<F, Fut>(self, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(S, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.route("PUT", pattern, handler)
    }

    /// Routes `DELETE` requests for `pattern`.
    pub fn delete<F, Fut>(self, pattern: &str, handler: F) -> Router<S>
    where
        F: Fn(S, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + Send + 'static,
    {
        self.route("DELETE", pattern, handler)
    }

    /// The state handlers get.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Calls the handler for the request's method and path: 404 when no pattern matches the
    /// path, 405 (with `Allow`) when one does but not for this method.
    pub fn handle(&self, mut req: Request) -> impl Future<Output = Response> + Send + 'static {
        let found = match self.paths.at(req.path()) {
            Err(_) => Err(Response::text(
                404,
                format!("no route for {}\n", req.path()),
            )),
            Ok(matched) => {
                let params = matched
                    .params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let methods = &self.methods[*matched.value];
                let method = req.method();
                let handler = methods
                    .iter()
                    .find(|(m, _)| m == method || (method == "HEAD" && m == "GET"))
                    .map(|(_, h)| h.clone());
                match handler {
                    Some(handler) => Ok((handler, params)),
                    None => {
                        let mut allow: Vec<&str> =
                            methods.iter().map(|(m, _)| m.as_str()).collect();
                        if allow.contains(&"GET") {
                            allow.push("HEAD");
                        }
                        Err(
                            Response::text(405, format!("{} is not allowed here\n", req.method()))
                                .with_header("allow", allow.join(", ")),
                        )
                    }
                }
            }
        };
        let state = self.state.clone();
        async move {
            match found {
                Ok((handler, params)) => {
                    req.set_params(params);
                    handler(state, req).await
                }
                Err(response) => response,
            }
        }
    }
}
