//! Just enough of the W3C WebDriver protocol to drive headless Chromium through chromedriver
//! (Debian packages chromium and chromium-driver): new session, navigate, run a script,
//! screenshot. Plain HTTP/1.1 over loopback, one request per connection.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian puts the driver and the browser.
const DRIVER: &str = "/usr/bin/chromedriver";
const BROWSER: &str = "/usr/bin/chromium";

/// One HTTP request; returns (status, JSON body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // Read the head, then exactly Content-Length bytes (chromedriver may keep the
    // connection open), or to the end of the stream when no length is given.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the end of the headers".into());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let lower = head.to_ascii_lowercase();
    let length = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed before the end of the body".into());
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body).map_err(|e| e.to_string())?;
            if lower.contains("transfer-encoding: chunked") {
                body = dechunk(&body)?;
            }
        }
    }
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&body)))?
    };
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk")?;
        let len = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16)
            .map_err(|e| e.to_string())?;
        if len == 0 {
            return Ok(out);
        }
        let start = eol + 2;
        out.extend_from_slice(b.get(start..start + len).ok_or("short chunk")?);
        b = b.get(start + len + 2..).ok_or("short chunk")?;
    }
}

/// Standard base64 (screenshots arrive as base64 PNG).
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let val = |c: u8| -> Result<u32, String> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("bad base64 byte {c}")),
        } as u32)
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    Ok(out)
}

/// A chromedriver process and one browser session, both ended on drop.
pub(crate) struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver on a free port and open a headless Chromium session.
    pub(crate) fn start() -> Result<Self, String> {
        for p in [DRIVER, BROWSER] {
            if !std::path::Path::new(p).exists() {
                return Err(format!(
                    "{p} is missing: install the Debian packages chromium and chromium-driver (.ci/run does)"
                ));
            }
        }
        let port = super::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start chromedriver: {e}"))?;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match http(addr, "GET", "/status", None) {
                Ok((200, v)) if v["value"]["ready"] == json!(true) => break,
                _ if Instant::now() > end => return Err("chromedriver never became ready".into()),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": BROWSER,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1400,1100",
                    format!("--user-data-dir={}", b._profile.path().display()),
                ]
            }
        }}});
        let (st, v) = http(addr, "POST", "/session", Some(&caps))?;
        if st != 200 {
            return Err(format!("new session: {st} {v}"));
        }
        b.session = v["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {v}"))?
            .to_string();
        Ok(b)
    }

    fn cmd(&self, method: &str, what: &str, body: Option<&Value>) -> Result<Value, String> {
        let path = format!("/session/{}/{what}", self.session);
        let (st, v) = http(self.addr, method, &path, body)?;
        if st != 200 {
            return Err(format!("{what}: {st} {v}"));
        }
        Ok(v["value"].clone())
    }

    /// Load `url`.
    pub(crate) fn goto(&self, url: &str) -> Result<(), String> {
        self.cmd("POST", "url", Some(&json!({ "url": url })))
            .map(|_| ())
    }

    /// Run `script` (a function body; `return` gives the result) in the page.
    pub(crate) fn eval(&self, script: &str) -> Result<Value, String> {
        self.cmd(
            "POST",
            "execute/sync",
            Some(&json!({ "script": script, "args": [] })),
        )
    }

    /// A PNG of the window.
    pub(crate) fn screenshot(&self) -> Result<Vec<u8>, String> {
        let v = self.cmd("GET", "screenshot", None)?;
        base64_decode(v.as_str().ok_or("screenshot is not a string")?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trips_known_vectors() {
        assert_eq!(
            super::base64_decode("aGVsbG8=").as_deref(),
            Ok(&b"hello"[..])
        );
        assert_eq!(super::base64_decode("aGk=").as_deref(), Ok(&b"hi"[..]));
        assert_eq!(super::base64_decode("YWJj").as_deref(), Ok(&b"abc"[..]));
        assert!(super::base64_decode("a*b=").is_err());
    }
}
