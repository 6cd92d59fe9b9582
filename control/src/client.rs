//! A small HTTP/1.1 client of the agent's API, over its unix socket or TCP
//! (with the bearer token): what cloisonctl and the tests use.
use std::path::PathBuf;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::TokioIo;

/// Where an agent listens: `unix:PATH`, `tcp:ADDR` (plain, loopback
/// only), or `https:ADDR` (a TCP listener with TLS; its CA certificate
/// file alongside).
#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    Https(String, Option<PathBuf>),
}

impl std::str::FromStr for Endpoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return Ok(Endpoint::Tcp(a.into()));
        }
        if let Some(a) = s.strip_prefix("https:") {
            return Ok(Endpoint::Https(a.into(), None));
        }
        anyhow::bail!("{s:?}: expected unix:PATH, tcp:HOST:PORT or https:HOST:PORT")
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

/// An answer: status and body.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "answer is not JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Client {
    pub async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer> {
        let res = self.respond(method, path, body).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes().to_vec();
        Ok(Answer { status, body })
    }

    /// GETs `path` and hands each line of a 200 answer's body to `on_line`
    /// as it comes, until the body ends or `on_line` says stop (false):
    /// then None. Another status: its answer.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<Option<Answer>> {
        let res = self.respond(Method::GET, path, None).await?;
        let status = res.status().as_u16();
        let mut body = res.into_body();
        if status != 200 {
            let body = body.collect().await?.to_bytes().to_vec();
            return Ok(Some(Answer { status, body }));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                if !on_line(String::from_utf8_lossy(&line[..nl]).trim_end()) {
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    async fn respond(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cloisond");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let res = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(|| format!("connect to {}", p.display()))?;
                send(TokioIo::new(s), req).await?
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .with_context(|| format!("connect to {a}"))?;
                send(TokioIo::new(s), req).await?
            }
            Endpoint::Https(a, ca) => {
                let ca = ca
                    .as_ref()
                    .context("an https: endpoint needs the CA certificate (--ca-file)")?;
                let config = crate::tls::client_config(ca)?;
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
                    .with_context(|| format!("{host} as a TLS server name"))?;
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .with_context(|| format!("connect to {a}"))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, s)
                    .await
                    .with_context(|| format!("TLS with {a}"))?;
                send(TokioIo::new(tls), req).await?
            }
        };
        Ok(res)
    }

    pub async fn get(&self, path: &str) -> Result<Answer> {
        self.call(Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: &serde_json::Value) -> Result<Answer> {
        self.call(Method::PUT, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Answer> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn delete(&self, path: &str) -> Result<Answer> {
        self.call(Method::DELETE, path, None).await
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}
