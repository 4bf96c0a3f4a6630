//! A small in-memory Kubernetes API behind kube-rs's mocked service
//! (tower-test): enough of it for the webhook's claim pool and the pool
//! keeper. Objects are JSON; writes honour `metadata.resourceVersion`
//! preconditions (409 Conflict) and names (409 AlreadyExists) as the API
//! server does, so optimistic concurrency is exercised for real.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub status: u16,
}

#[derive(Default)]
pub struct State {
    /// "resource/namespace/name" → object.
    pub objects: BTreeMap<String, Value>,
    pub log: Vec<Seen>,
    next_rv: u64,
}

/// The fake API server.
#[derive(Clone)]
pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
    /// Hold this many PersistentVolumeClaim lists and answer them together,
    /// so that concurrent admissions see the same pool.
    pub hold_claim_lists: usize,
}

fn key(resource: &str, namespace: &str, name: &str) -> String {
    format!("{resource}/{namespace}/{name}")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn selector_matches(obj: &Value, selector: &str) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k] == v,
            None => !labels[term].is_null(),
        })
}

impl FakeApi {
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                next_rv: 100,
                ..Default::default()
            })),
            hold_claim_lists: 0,
        }
    }

    /// Stores `obj` (its kind decides the resource).
    pub fn put(&self, resource: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.next_rv += 1;
        let rv = s.next_rv.to_string();
        obj["metadata"]["resourceVersion"] = json!(rv);
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("shop")
            .to_owned();
        obj["metadata"]["namespace"] = json!(ns);
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        s.objects.insert(key(resource, &ns, &name), obj);
    }

    pub fn remove(&self, resource: &str, namespace: &str, name: &str) {
        self.state
            .lock()
            .unwrap()
            .objects
            .remove(&key(resource, namespace, name));
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(&key(resource, namespace, name))
            .cloned()
    }

    pub fn all(&self, resource: &str) -> Vec<Value> {
        let prefix = format!("{resource}/");
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    /// A client served by this fake, and the task serving it.
    pub fn client(&self) -> (kube::Client, tokio::task::JoinHandle<()>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let me = self.clone();
        (client, tokio::spawn(me.serve(handle)))
    }

    async fn serve(self, mut handle: Handle) {
        let mut held: Vec<(Request<Body>, Respond)> = Vec::new();
        let mut holding = self.hold_claim_lists > 1;
        while let Some((request, respond)) = handle.next_request().await {
            let is_claim_list = request.method() == Method::GET
                && request.uri().path().ends_with("/persistentvolumeclaims");
            if is_claim_list && holding {
                if held.len() + 1 < self.hold_claim_lists {
                    held.push((request, respond));
                    continue;
                }
                holding = false;
            }
            let me = self.clone();
            if is_claim_list && !held.is_empty() {
                // Answer the held lists now, from the same state.
                for (r, s) in held.drain(..) {
                    me.answer(r, s).await;
                }
            }
            me.answer(request, respond).await;
        }
    }

    async fn answer(&self, request: Request<Body>, respond: Respond) {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let (code, reply) = self.handle(&method, &path, &query, &body);
        self.state.lock().unwrap().log.push(Seen {
            method,
            path,
            query,
            body,
            status: code.as_u16(),
        });
        respond.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        // /api/v1/namespaces/NS/RESOURCE[/NAME] or /apis/G/V/namespaces/NS/RESOURCE[/NAME]
        // or cluster-wide lists /api/v1/RESOURCE, /apis/G/V/RESOURCE.
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let rest = if parts[0] == "api" {
            &parts[2..]
        } else {
            &parts[3..]
        };
        let (namespace, resource, name) = match rest {
            ["namespaces", ns, res] => (Some(*ns), *res, None),
            ["namespaces", ns, res, name] => (Some(*ns), *res, Some(*name)),
            [res] => (None, *res, None),
            _ => {
                return (
                    StatusCode::NOT_FOUND,
                    status(404, "NotFound", "no such path"),
                );
            }
        };
        let selector = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(|s| {
                s.replace("%3D", "=")
                    .replace("%2F", "/")
                    .replace("%2C", ",")
            })
            .unwrap_or_default();
        let mut s = self.state.lock().unwrap();
        match (method.clone(), name) {
            (Method::GET, None) => {
                let prefix = match namespace {
                    Some(ns) => format!("{resource}/{ns}/"),
                    None => format!("{resource}/"),
                };
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|(k, v)| k.starts_with(&prefix) && selector_matches(v, &selector))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (Method::GET, Some(name)) => {
                match s.objects.get(&key(resource, namespace.unwrap(), name)) {
                    Some(o) => (StatusCode::OK, o.clone()),
                    None => (
                        StatusCode::NOT_FOUND,
                        status(404, "NotFound", &format!("{resource} {name:?} not found")),
                    ),
                }
            }
            (Method::POST, None) => {
                let ns = namespace.unwrap();
                let name = body["metadata"]["name"].as_str().unwrap().to_owned();
                let k = key(resource, ns, &name);
                if s.objects.contains_key(&k) {
                    return (
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("{resource} {name:?} already exists"),
                        ),
                    );
                }
                s.next_rv += 1;
                let mut obj = body.clone();
                obj["metadata"]["resourceVersion"] = json!(s.next_rv.to_string());
                obj["metadata"]["namespace"] = json!(ns);
                obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                s.objects.insert(k, obj.clone());
                (StatusCode::CREATED, obj)
            }
            (Method::PATCH, Some(name)) => {
                let k = key(resource, namespace.unwrap(), name);
                let next_rv = s.next_rv + 1;
                let Some(obj) = s.objects.get_mut(&k) else {
                    return (
                        StatusCode::NOT_FOUND,
                        status(404, "NotFound", &format!("{resource} {name:?} not found")),
                    );
                };
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                    && obj["metadata"]["resourceVersion"] != rv
                {
                    return (
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ),
                    );
                }
                let mut patch = body.clone();
                if let Some(m) = patch["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                merge(obj, &patch);
                obj["metadata"]["resourceVersion"] = json!(next_rv.to_string());
                let out = obj.clone();
                s.next_rv = next_rv;
                (StatusCode::OK, out)
            }
            (Method::DELETE, Some(name)) => {
                let k = key(resource, namespace.unwrap(), name);
                match s.objects.get(&k) {
                    None => (StatusCode::NOT_FOUND, status(404, "NotFound", "not found")),
                    Some(obj) => {
                        if let Some(rv) = body["preconditions"]["resourceVersion"].as_str()
                            && obj["metadata"]["resourceVersion"] != rv
                        {
                            return (
                                StatusCode::CONFLICT,
                                status(409, "Conflict", "precondition failed"),
                            );
                        }
                        let obj = s.objects.remove(&k).unwrap();
                        (StatusCode::OK, obj)
                    }
                }
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status(405, "MethodNotAllowed", "not in the fake"),
            ),
        }
    }
}

/// Waits for `f` to hold, up to 10 s.
pub async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within 10 s");
}
