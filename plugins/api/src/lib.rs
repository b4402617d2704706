//! api: a small JSON API, written as an axum user would write it. Shows routing with
//! parameters (`plugin_api::Router`, on matchit), JSON request and response bodies (the `json`
//! feature, serde), cookies, and what the host tells about each request: the client's address,
//! whether it came over TLS, its HTTP version and its id (also in the host's log lines).
//!
//! - `GET /hello/{name}`: a greeting
//! - `POST /items` with `{"name": "...", "qty": N}`: 201 and the item with its new id
//! - `GET /items/{id}`: the item, or 404
//! - `GET /whoami`: the request's facts as JSON; counts visits in a cookie

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use plugin_api::{AsyncPlugin, Context, Cookie, Request, Response, Router};
use serde::{Deserialize, Serialize};

/// An item as clients send it.
#[derive(Debug, Deserialize)]
pub struct NewItem {
    name: String,
    qty: u32,
}

/// An item as the API answers with it.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    id: u64,
    name: String,
    qty: u32,
}

/// The handlers' state: cloned per request, so what it shares is behind an `Arc`. (Items live
/// in this worker's memory: each worker has its own, and a reload loses them. The `counter`
/// example keeps state in the host's store instead.)
#[derive(Clone, Default)]
pub struct App {
    items: Arc<Mutex<HashMap<u64, Item>>>,
}

async fn hello(_app: App, req: Request) -> Response {
    let name = req.param("name").unwrap_or("stranger");
    Response::text(200, format!("hello, {name}\n"))
}

async fn create(app: App, mut req: Request) -> Response {
    let new: NewItem = match req.json().await {
        Ok(new) => new,
        // 400 for JSON that does not fit, 413 past max_body_bytes.
        Err(e) => return e.into(),
    };
    if new.name.is_empty() {
        return Response::text(422, "name must not be empty\n");
    }
    let mut items = app.items.lock().unwrap();
    let id = items.len() as u64 + 1;
    let item = Item {
        id,
        name: new.name,
        qty: new.qty,
    };
    items.insert(id, item.clone());
    plugin_api::info!("created item {id}");
    Response::json_value(201, &item)
}

async fn get_item(app: App, req: Request) -> Response {
    let item = req
        .param("id")
        .and_then(|id| id.parse::<u64>().ok())
        .and_then(|id| app.items.lock().unwrap().get(&id).cloned());
    match item {
        Some(item) => Response::json_value(200, &item),
        None => Response::text(404, "no such item\n"),
    }
}

#[derive(Serialize)]
struct WhoAmI<'a> {
    client_addr: Option<String>,
    tls: bool,
    http_version: &'a str,
    /// The `Host` header (over HTTP/2, the host gives the `:authority` as `host`).
    host: Option<&'a str>,
    request_id: &'a str,
    visits: u32,
}

async fn whoami(_app: App, req: Request) -> Response {
    let visits = req
        .cookie("visits")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    plugin_api::info!("whoami from {:?}", req.client_addr());
    let facts = WhoAmI {
        client_addr: req.client_addr().map(|a| a.to_string()),
        tls: req.is_tls(),
        http_version: req.http_version(),
        host: req.header("host"),
        request_id: req.id(),
        visits,
    };
    let mut cookie = Cookie::new("visits", visits.to_string());
    cookie.set_path("/");
    cookie.set_http_only(true);
    Response::json_value(200, &facts).with_cookie(cookie)
}

/// The plugin: its routes.
pub struct Api {
    router: Router<App>,
}

impl Api {
    /// The routes, also for unit tests.
    pub fn router() -> Router<App> {
        Router::new(App::default())
            .get("/hello/{name}", hello)
            .post("/items", create)
            .get("/items/{id}", get_item)
            .get("/whoami", whoami)
    }
}

impl AsyncPlugin for Api {
    async fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Api {
            router: Api::router(),
        })
    }

    async fn handle(&self, req: Request) -> Response {
        self.router.handle(req).await
    }
}

plugin_api::export_async_plugin!(Api);

#[cfg(test)]
mod tests {
    use super::*;

    fn call(router: &Router<App>, req: Request) -> Response {
        plugin_api::tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(router.handle(req))
    }

    #[test]
    fn creates_and_reads_items() {
        let router = Api::router();
        let created = call(
            &router,
            Request::new("POST", "/items").with_body(r#"{"name":"pen","qty":3}"#),
        );
        assert_eq!(created.status(), 201);
        assert_eq!(created.body(), br#"{"id":1,"name":"pen","qty":3}"#);
        let read = call(&router, Request::new("GET", "/items/1"));
        assert_eq!(read.body(), created.body());
        assert_eq!(call(&router, Request::new("GET", "/items/9")).status(), 404);
        let bad = call(&router, Request::new("POST", "/items").with_body("{"));
        assert_eq!(bad.status(), 400);
    }
}
