//! The Redis commands, executed against one node's [`Store`]: one function per command
//! family, dispatched by [`execute`], replies and error texts as Redis writes them. Pure: the
//! time and the node's identity are passed in. Which node a command runs on is decided by
//! [`route`] (single-key commands go to the key's owner, multi-key ones are split by the
//! caller with [`split`] and their partial replies merged with [`merge`]).

use smallvec::SmallVec;

use crate::resp::Frame;
use crate::store::{SetOptions, Store, StoreError, Ttl};

/// What the node tells keyless commands about itself.
#[derive(Debug, Clone)]
pub struct Env<'a> {
    /// Node id.
    pub node_id: &'a str,
    /// The RESP port this node listens on.
    pub port: u16,
    /// Alive members of the cluster.
    pub cluster_size: usize,
    /// Connected clients on this node.
    pub clients: usize,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<'a> {
    /// The reply to send.
    pub reply: Frame,
    /// Keys whose state changed (to replicate), borrowed from the command.
    pub written: SmallVec<[&'a [u8]; 2]>,
    /// Close the connection after the reply (QUIT).
    pub quit: bool,
}

impl<'a> Outcome<'a> {
    fn reply(reply: Frame) -> Outcome<'a> {
        Outcome {
            reply,
            written: SmallVec::new(),
            quit: false,
        }
    }
    fn wrote(reply: Frame, key: &'a [u8]) -> Outcome<'a> {
        let mut written = SmallVec::new();
        written.push(key);
        Outcome {
            reply,
            written,
            quit: false,
        }
    }
}

/// Where a command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// On the node that received it (no key, or a malformed command whose error is local).
    Local,
    /// On the owner of this key.
    Key(&'a [u8]),
    /// On the owners of several keys: split with [`split`], merge with [`merge`].
    Multi,
}

/// Upper-cased command name.
pub fn name(cmd: &[&[u8]]) -> String {
    cmd.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

/// The upper-cased name of a command, on the stack: the hot path (every GET and SET) looks
/// at it several times and should not allocate for it. Names longer than any command, or not
/// UTF-8, read as `""` (which no command matches, so they are unknown commands).
pub(crate) struct Name {
    buf: [u8; 16],
    len: usize,
}

impl Name {
    pub(crate) fn of(cmd: &[&[u8]]) -> Name {
        let mut buf = [0u8; 16];
        let raw = cmd.first().copied().unwrap_or_default();
        if raw.len() > buf.len() {
            return Name { buf, len: 0 };
        }
        for (b, r) in buf.iter_mut().zip(raw) {
            *b = r.to_ascii_uppercase();
        }
        Name {
            buf,
            len: raw.len(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// Commands taking one key at argument 1, with their arity (Redis convention: positive is
/// exact, negative is a minimum).
const SINGLE_KEY: &[(&str, i32)] = &[
    ("GET", 2),
    ("SET", -3),
    ("GETDEL", 2),
    ("EXPIRE", -3),
    ("PEXPIRE", -3),
    ("EXPIREAT", -3),
    ("PEXPIREAT", -3),
    ("TTL", 2),
    ("PTTL", 2),
    ("PERSIST", 2),
    ("INCR", 2),
    ("DECR", 2),
    ("INCRBY", 3),
    ("DECRBY", 3),
    ("APPEND", 3),
    ("STRLEN", 2),
    ("SETNX", 3),
    ("SETEX", 4),
    ("PSETEX", 4),
];

fn arity_ok(n: usize, arity: i32) -> bool {
    if arity >= 0 {
        n == arity as usize
    } else {
        n >= arity.unsigned_abs() as usize
    }
}

/// Where `cmd` runs.
pub fn route<'a>(cmd: &[&'a [u8]]) -> Route<'a> {
    let name = Name::of(cmd);
    let name = name.as_str();
    if let Some((_, arity)) = SINGLE_KEY.iter().find(|(n, _)| *n == name) {
        if arity_ok(cmd.len(), *arity) {
            return Route::Key(cmd[1]);
        }
        return Route::Local;
    }
    match name {
        "MGET" | "DEL" | "EXISTS" | "UNLINK" if cmd.len() >= 2 => Route::Multi,
        "MSET" if cmd.len() >= 3 && cmd.len() % 2 == 1 => Route::Multi,
        _ => Route::Local,
    }
}

/// The keys of a multi-key command, each with the arguments that go with it (MSET: the
/// value).
pub fn split<'c, 'a>(cmd: &'c [&'a [u8]]) -> Vec<(&'a [u8], &'c [&'a [u8]])> {
    let rest = cmd.get(1..).unwrap_or_default();
    if Name::of(cmd).as_str() == "MSET" {
        rest.chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0], c))
            .collect()
    } else {
        rest.iter().map(|k| (*k, std::slice::from_ref(k))).collect()
    }
}

/// Merge the replies of the parts of a multi-key command. `parts` holds, for each
/// sub-command sent, the positions (in key order) of its keys and its reply.
pub fn merge(cmd: &[&[u8]], nkeys: usize, parts: Vec<(Vec<usize>, Frame)>) -> Frame {
    let name = Name::of(cmd);
    if let Some((_, Frame::Error(e))) = parts.iter().find(|(_, f)| matches!(f, Frame::Error(_))) {
        return Frame::Error(e.clone());
    }
    match name.as_str() {
        "MSET" => Frame::ok(),
        "MGET" => {
            let mut out = vec![Frame::Null; nkeys];
            for (idx, f) in parts {
                if let Frame::Array(items) = f {
                    for (i, v) in idx.into_iter().zip(items) {
                        if let Some(slot) = out.get_mut(i) {
                            *slot = v;
                        }
                    }
                }
            }
            Frame::Array(out)
        }
        _ => Frame::Integer(
            parts
                .iter()
                .map(|(_, f)| match f {
                    Frame::Integer(n) => *n,
                    _ => 0,
                })
                .sum(),
        ),
    }
}

fn wrong_args(name: &str) -> Frame {
    Frame::err(format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn syntax() -> Frame {
    Frame::err("ERR syntax error")
}

fn not_int() -> Frame {
    Frame::err(StoreError::NotInteger.to_string())
}

fn store_err(e: StoreError) -> Frame {
    Frame::err(e.to_string())
}

fn parse_i64(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.starts_with('+') || s.len() > 20 {
        return None;
    }
    s.parse().ok()
}

fn unknown(cmd: &[&[u8]]) -> Frame {
    let mut args = String::new();
    for a in cmd.iter().skip(1).take(20) {
        let a = String::from_utf8_lossy(a);
        let a: String = a.chars().take(128).collect();
        args.push_str(&format!("'{a}' "));
    }
    let n: String = String::from_utf8_lossy(cmd.first().copied().unwrap_or_default())
        .chars()
        .take(128)
        .collect();
    Frame::err(format!(
        "ERR unknown command '{n}', with args beginning with: {args}"
    ))
}

/// Run `cmd` on `store` at time `now`.
pub fn execute<'a>(store: &mut Store, cmd: &[&'a [u8]], now: u64, env: &Env) -> Outcome<'a> {
    let name = Name::of(cmd);
    let name = name.as_str();
    if let Some((_, arity)) = SINGLE_KEY.iter().find(|(n, _)| *n == name) {
        if !arity_ok(cmd.len(), *arity) {
            return Outcome::reply(wrong_args(name));
        }
        return strings(store, name, cmd, now);
    }
    match name {
        "MGET" | "MSET" | "DEL" | "UNLINK" | "EXISTS" | "DBSIZE" => keys(store, name, cmd, now),
        _ => server(store, name, cmd, env),
    }
}

/// Single-key string commands.
fn strings<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let key = cmd[1];
    match name {
        "GET" => Outcome::reply(store.get(key, now).map(Frame::Bulk).unwrap_or(Frame::Null)),
        "GETDEL" => match store.getdel(key, now) {
            Some(v) => Outcome::wrote(Frame::Bulk(v), key),
            None => Outcome::reply(Frame::Null),
        },
        "SET" => set(store, cmd, now),
        "SETNX" => {
            let opts = SetOptions {
                nx: true,
                ..Default::default()
            };
            match store.set(key, cmd[2], opts, now) {
                Ok(o) if o.written => Outcome::wrote(Frame::Integer(1), key),
                Ok(_) => Outcome::reply(Frame::Integer(0)),
                Err(e) => Outcome::reply(store_err(e)),
            }
        }
        "SETEX" | "PSETEX" => {
            let unit = if name == "SETEX" { 1000 } else { 1 };
            match parse_i64(cmd[2]) {
                Some(t) if t > 0 => {
                    let Some(at) = (t as u64)
                        .checked_mul(unit)
                        .and_then(|d| now.checked_add(d))
                    else {
                        return Outcome::reply(expire_err(name));
                    };
                    let opts = SetOptions {
                        expire_at: Some(at),
                        ..Default::default()
                    };
                    match store.set(key, cmd[3], opts, now) {
                        Ok(_) => Outcome::wrote(Frame::ok(), key),
                        Err(e) => Outcome::reply(store_err(e)),
                    }
                }
                Some(_) => Outcome::reply(expire_err(name)),
                None => Outcome::reply(not_int()),
            }
        }
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => expire(store, name, cmd, now),
        "TTL" | "PTTL" => Outcome::reply(Frame::Integer(match store.ttl(key, now) {
            Ttl::Missing => -2,
            Ttl::Persistent => -1,
            Ttl::Ms(ms) if name == "TTL" => {
                (ms.saturating_add(500) / 1000).min(i64::MAX as u64) as i64
            }
            Ttl::Ms(ms) => ms.min(i64::MAX as u64) as i64,
        })),
        "PERSIST" => match store.ttl(key, now) {
            Ttl::Ms(_) => {
                store.set_expiry(key, None, now);
                Outcome::wrote(Frame::Integer(1), key)
            }
            _ => Outcome::reply(Frame::Integer(0)),
        },
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let by = match name {
                "INCR" => Some(1),
                "DECR" => Some(-1),
                "INCRBY" => parse_i64(cmd[2]),
                _ => parse_i64(cmd[2]).and_then(i64::checked_neg),
            };
            let Some(by) = by else {
                return Outcome::reply(if name == "DECRBY" && parse_i64(cmd[2]).is_some() {
                    Frame::err("ERR decrement would overflow")
                } else {
                    not_int()
                });
            };
            match store.incr_by(key, by, now) {
                Ok(n) => Outcome::wrote(Frame::Integer(n), key),
                Err(e) => Outcome::reply(store_err(e)),
            }
        }
        "APPEND" => match store.append(key, cmd[2], now) {
            Ok(n) => Outcome::wrote(Frame::Integer(n as i64), key),
            Err(e) => Outcome::reply(store_err(e)),
        },
        "STRLEN" => Outcome::reply(Frame::Integer(store.strlen(key, now) as i64)),
        _ => Outcome::reply(unknown(cmd)),
    }
}

fn expire_err(name: &str) -> Frame {
    Frame::err(format!(
        "ERR invalid expire time in '{}' command",
        name.to_ascii_lowercase()
    ))
}

/// SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]
fn set<'a>(store: &mut Store, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let key = cmd[1];
    let mut opts = SetOptions::default();
    let mut get = false;
    let mut expiry_given = false;
    let mut i = 3;
    while i < cmd.len() {
        let opt = String::from_utf8_lossy(cmd[i]).to_ascii_uppercase();
        match opt.as_str() {
            "NX" if !opts.xx => opts.nx = true,
            "XX" if !opts.nx => opts.xx = true,
            "GET" => get = true,
            "KEEPTTL" if !expiry_given => {
                opts.keep_ttl = true;
                expiry_given = true;
            }
            "EX" | "PX" | "EXAT" | "PXAT" if !expiry_given => {
                expiry_given = true;
                let Some(arg) = cmd.get(i + 1) else {
                    return Outcome::reply(syntax());
                };
                let Some(n) = parse_i64(arg) else {
                    return Outcome::reply(not_int());
                };
                if n <= 0 {
                    return Outcome::reply(expire_err("set"));
                }
                let n = n as u64;
                let at = match opt.as_str() {
                    "EX" => n.checked_mul(1000).and_then(|d| now.checked_add(d)),
                    "PX" => now.checked_add(n),
                    "EXAT" => n.checked_mul(1000),
                    _ => Some(n),
                };
                let Some(at) = at else {
                    return Outcome::reply(expire_err("set"));
                };
                opts.expire_at = Some(at);
                i += 1;
            }
            _ => return Outcome::reply(syntax()),
        }
        i += 1;
    }
    opts.get = get;
    match store.set(key, cmd[2], opts, now) {
        Err(e) => Outcome::reply(store_err(e)),
        Ok(o) => {
            let reply = match (get, o.written) {
                (true, _) => o.old.map(Frame::Bulk).unwrap_or(Frame::Null),
                (false, true) => Frame::ok(),
                (false, false) => Frame::Null,
            };
            if o.written {
                Outcome::wrote(reply, key)
            } else {
                Outcome::reply(reply)
            }
        }
    }
}

/// EXPIRE key seconds [NX|XX|GT|LT] and friends.
fn expire<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let key = cmd[1];
    let Some(n) = parse_i64(cmd[2]) else {
        return Outcome::reply(not_int());
    };
    let at: Option<i128> = match name {
        "EXPIRE" => Some(now as i128 + n as i128 * 1000),
        "PEXPIRE" => Some(now as i128 + n as i128),
        "EXPIREAT" => Some(n as i128 * 1000),
        _ => Some(n as i128),
    };
    let Some(at) = at.filter(|t| *t <= u64::MAX as i128) else {
        return Outcome::reply(expire_err(name));
    };
    let at = at.max(0) as u64;
    let cur = store.ttl(key, now);
    if cur == Ttl::Missing {
        return Outcome::reply(Frame::Integer(0));
    }
    let cur_at = match cur {
        Ttl::Ms(ms) => Some(now + ms),
        _ => None,
    };
    for flag in &cmd[3..] {
        let ok = match String::from_utf8_lossy(flag).to_ascii_uppercase().as_str() {
            "NX" => cur_at.is_none(),
            "XX" => cur_at.is_some(),
            "GT" => cur_at.is_some_and(|c| at > c),
            "LT" => cur_at.is_none_or(|c| at < c),
            other => return Outcome::reply(Frame::err(format!("ERR Unsupported option {other}"))),
        };
        if !ok {
            return Outcome::reply(Frame::Integer(0));
        }
    }
    store.set_expiry(key, Some(at), now);
    Outcome::wrote(Frame::Integer(1), key)
}

/// MGET, MSET, DEL, EXISTS, DBSIZE on this node's store only (the caller splits by owner).
fn keys<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let args = &cmd[1..];
    match name {
        "DBSIZE" if args.is_empty() => Outcome::reply(Frame::Integer(store.len() as i64)),
        "MGET" if !args.is_empty() => Outcome::reply(Frame::Array(
            args.iter()
                .map(|k| store.get(k, now).map(Frame::Bulk).unwrap_or(Frame::Null))
                .collect(),
        )),
        "MSET" if !args.is_empty() && args.len().is_multiple_of(2) => {
            let mut written = SmallVec::new();
            for kv in args.chunks(2) {
                if let Err(e) = store.set(kv[0], kv[1], SetOptions::default(), now) {
                    return Outcome {
                        reply: store_err(e),
                        written,
                        quit: false,
                    };
                }
                written.push(kv[0]);
            }
            Outcome {
                reply: Frame::ok(),
                written,
                quit: false,
            }
        }
        "DEL" | "UNLINK" if !args.is_empty() => {
            let written: SmallVec<[&[u8]; 2]> =
                args.iter().filter(|k| store.del(k, now)).copied().collect();
            Outcome {
                reply: Frame::Integer(written.len() as i64),
                written,
                quit: false,
            }
        }
        "EXISTS" if !args.is_empty() => Outcome::reply(Frame::Integer(
            args.iter().filter(|k| store.exists(k, now)).count() as i64,
        )),
        _ => Outcome::reply(wrong_args(name)),
    }
}

fn arg_upper(cmd: &[&[u8]], i: usize) -> String {
    cmd.get(i)
        .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
        .unwrap_or_default()
}

/// Connection and server commands.
fn server<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], env: &Env) -> Outcome<'a> {
    let n = cmd.len();
    let reply = match name {
        "PING" if n == 1 => Frame::Simple("PONG".into()),
        "PING" if n == 2 => Frame::Bulk(cmd[1].to_vec()),
        "ECHO" if n == 2 => Frame::Bulk(cmd[1].to_vec()),
        "QUIT" => {
            return Outcome {
                reply: Frame::ok(),
                written: SmallVec::new(),
                quit: true,
            }
        }
        "SELECT" if n == 2 => match parse_i64(cmd[1]) {
            Some(0) => Frame::ok(),
            Some(_) => Frame::err("ERR DB index is out of range"),
            None => not_int(),
        },
        "COMMAND" => match arg_upper(cmd, 1).as_str() {
            "" | "DOCS" | "INFO" | "LIST" => Frame::Array(vec![]),
            "COUNT" => Frame::Integer(0),
            _ => Frame::Array(vec![]),
        },
        "CONFIG" if n >= 2 => match arg_upper(cmd, 1).as_str() {
            "GET" if n >= 3 => config_get(store, &cmd[2..]),
            "SET" | "RESETSTAT" | "REWRITE" => Frame::ok(),
            _ => Frame::err(format!(
                "ERR unknown subcommand '{}'. Try CONFIG HELP.",
                String::from_utf8_lossy(cmd[1])
            )),
        },
        "CLIENT" if n >= 2 => match arg_upper(cmd, 1).as_str() {
            "GETNAME" => Frame::Null,
            "ID" => Frame::Integer(1),
            _ => Frame::ok(),
        },
        "HELLO" => match cmd.get(1).map(|v| parse_i64(v)) {
            None | Some(Some(2)) => hello(env),
            Some(Some(_)) => Frame::err("NOPROTO sorry, this protocol version is not supported"),
            Some(None) => Frame::err("ERR Protocol version is not an integer or out of range"),
        },
        "INFO" => Frame::Bulk(info(store, env).into_bytes()),
        "DBSIZE" | "PING" | "ECHO" | "SELECT" | "CONFIG" | "CLIENT" => wrong_args(name),
        _ => unknown(cmd),
    };
    Outcome::reply(reply)
}

fn glob(pattern: &[u8], s: &[u8]) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((p, rest)) => match s.split_first() {
            Some((c, srest)) if p.eq_ignore_ascii_case(c) || *p == b'?' => glob(rest, srest),
            _ => false,
        },
    }
}

fn config_get(store: &Store, patterns: &[&[u8]]) -> Frame {
    let cfg = store.config();
    let params: [(&str, String); 6] = [
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("maxmemory", cfg.maxmemory.to_string()),
        ("maxmemory-policy", cfg.policy.as_str().into()),
        ("maxmemory-samples", cfg.samples.to_string()),
        ("databases", "1".into()),
    ];
    let mut out = Vec::new();
    for (k, v) in params {
        if patterns
            .iter()
            .any(|p| p.len() <= 64 && glob(p, k.as_bytes()))
        {
            out.push(Frame::bulk(k));
            out.push(Frame::bulk(v));
        }
    }
    Frame::Array(out)
}

fn hello(env: &Env) -> Frame {
    let pairs = [
        ("server", Frame::bulk("redis")),
        ("version", Frame::bulk("7.0.0")),
        ("proto", Frame::Integer(2)),
        ("id", Frame::Integer(1)),
        ("mode", Frame::bulk("standalone")),
        ("role", Frame::bulk("master")),
        ("modules", Frame::Array(vec![])),
        ("dsys_node", Frame::bulk(env.node_id)),
    ];
    Frame::Array(
        pairs
            .into_iter()
            .flat_map(|(k, v)| [Frame::bulk(k), v])
            .collect(),
    )
}

/// The INFO text.
pub fn info(store: &Store, env: &Env) -> String {
    let st = store.stats();
    let cfg = store.config();
    format!(
        "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\ndsys_node:{}\r\ntcp_port:{}\r\n\
         dsys_cluster_size:{}\r\n\r\n# Clients\r\nconnected_clients:{}\r\n\r\n# Memory\r\n\
         used_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:{}\r\n\r\n# Stats\r\n\
         keyspace_hits:{}\r\nkeyspace_misses:{}\r\nevicted_keys:{}\r\nexpired_keys:{}\r\n\r\n\
         # Keyspace\r\ndb0:keys={},expires={},avg_ttl=0\r\n",
        env.node_id,
        env.port,
        env.cluster_size,
        env.clients,
        store.used_memory(),
        cfg.maxmemory,
        cfg.policy.as_str(),
        st.hits,
        st.misses,
        st.evictions,
        st.expired,
        store.len(),
        store.volatile_len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Policy, StoreConfig};

    fn env() -> Env<'static> {
        Env {
            node_id: "n1",
            port: 7401,
            cluster_size: 1,
            clients: 1,
        }
    }

    fn words(s: &str) -> Vec<&[u8]> {
        s.split(' ').map(str::as_bytes).collect()
    }

    /// Scripts of (command, expected reply) run in order on one store, at time 1000 + step.
    #[test]
    fn scripts() {
        use Frame::*;
        let b = |s: &str| Bulk(s.as_bytes().to_vec());
        let e = |s: &str| Error(s.into());
        let ok = Frame::ok();
        let script: Vec<(&str, Frame)> = vec![
            ("PING", Simple("PONG".into())),
            ("ping hi", b("hi")),
            ("ECHO x", b("x")),
            ("GET k", Null),
            ("SET k v", ok.clone()),
            ("GET k", b("v")),
            ("SET k w NX", Null),
            ("SET k w XX GET", b("v")),
            ("SET n 1 NX XX", e("ERR syntax error")),
            (
                "SET k v EX 0",
                e("ERR invalid expire time in 'set' command"),
            ),
            (
                "SET k v EX x",
                e("ERR value is not an integer or out of range"),
            ),
            ("SET k v EX 1 PX 1", e("ERR syntax error")),
            ("SET k v BOGUS", e("ERR syntax error")),
            ("GET", e("ERR wrong number of arguments for 'get' command")),
            (
                "GET a b",
                e("ERR wrong number of arguments for 'get' command"),
            ),
            ("SET t v PX 100", ok.clone()),
            ("PTTL t", Integer(100)),
            ("TTL t", Integer(0)),
            ("TTL k", Integer(-1)),
            ("TTL nope", Integer(-2)),
            ("PERSIST t", Integer(1)),
            ("PERSIST t", Integer(0)),
            ("EXPIRE t 10", Integer(1)),
            ("TTL t", Integer(10)),
            ("EXPIRE t 5 GT", Integer(0)),
            ("EXPIRE nope 5", Integer(0)),
            ("PEXPIRE t -1", Integer(1)),
            ("EXISTS t", Integer(0)),
            ("INCR c", Integer(1)),
            ("INCRBY c 10", Integer(11)),
            ("DECR c", Integer(10)),
            ("DECRBY c 20", Integer(-10)),
            ("INCR k", e("ERR value is not an integer or out of range")),
            (
                "INCRBY c x",
                e("ERR value is not an integer or out of range"),
            ),
            ("APPEND k xyz", Integer(4)),
            ("STRLEN k", Integer(4)),
            ("MSET a 1 b 2", ok.clone()),
            (
                "MSET a 1 b",
                e("ERR wrong number of arguments for 'mset' command"),
            ),
            ("MGET a nope b", Array(vec![b("1"), Null, b("2")])),
            ("EXISTS a b nope a", Integer(3)),
            ("DEL a nope", Integer(1)),
            ("GETDEL b", b("2")),
            ("GETDEL b", Null),
            ("DBSIZE", Integer(2)),
            ("SELECT 0", ok.clone()),
            ("SELECT 1", e("ERR DB index is out of range")),
            ("COMMAND DOCS", Array(vec![])),
            ("COMMAND", Array(vec![])),
            ("CONFIG GET save", Array(vec![b("save"), b("")])),
            (
                "CONFIG GET appendonly",
                Array(vec![b("appendonly"), b("no")]),
            ),
            ("CONFIG GET nothing", Array(vec![])),
            ("CLIENT SETNAME x", ok.clone()),
            (
                "HELLO 3",
                e("NOPROTO sorry, this protocol version is not supported"),
            ),
            ("QUIT", ok.clone()),
            (
                "FOO a b",
                e("ERR unknown command 'FOO', with args beginning with: 'a' 'b' "),
            ),
        ];
        let mut s = Store::new(StoreConfig::default());
        for (i, (cmd, want)) in script.into_iter().enumerate() {
            let out = execute(&mut s, &words(cmd), 1000, &env());
            assert_eq!(out.reply, want, "step {i}: {cmd}");
        }
        let out = execute(&mut s, &words("HELLO 2"), 1000, &env());
        assert!(matches!(out.reply, Frame::Array(ref v) if v.len() == 16));
        let info = execute(&mut s, &words("INFO"), 1000, &env());
        let Frame::Bulk(text) = info.reply else {
            panic!("info")
        };
        let text = String::from_utf8_lossy(&text);
        assert!(text.contains("keyspace_hits:"), "{text}");
        assert!(text.contains("maxmemory_policy:allkeys-lru"), "{text}");
    }

    #[test]
    fn written_keys_and_oom() {
        let mut s = Store::new(StoreConfig {
            maxmemory: 200,
            policy: Policy::Noeviction,
            ..StoreConfig::default()
        });
        let out = execute(&mut s, &words("SET a 1"), 0, &env());
        assert_eq!(out.written.as_slice(), [&b"a"[..]]);
        let out = execute(&mut s, &words("GET a"), 0, &env());
        assert!(out.written.is_empty());
        let value = vec![b'x'; 300];
        let big: [&[u8]; 3] = [b"SET", b"b", &value];
        let out = execute(&mut s, &big, 0, &env());
        assert_eq!(
            out.reply,
            Frame::err("OOM command not allowed when used memory > 'maxmemory'.")
        );
    }

    #[test]
    fn routing_split_merge() {
        assert_eq!(route(&words("GET k")), Route::Key(b"k"));
        assert_eq!(route(&words("GET")), Route::Local);
        assert_eq!(route(&words("PING")), Route::Local);
        assert_eq!(route(&words("MGET a b")), Route::Multi);
        assert_eq!(route(&words("MSET a 1 b")), Route::Local);
        let cmd = words("MSET a 1 b 2");
        let parts = split(&cmd);
        assert_eq!(parts[1], (&b"b"[..], &words("b 2")[..]));
        let cmd = words("MGET a b c");
        let merged = merge(
            &cmd,
            3,
            vec![
                (vec![1], Frame::Array(vec![Frame::bulk("B")])),
                (
                    vec![0, 2],
                    Frame::Array(vec![Frame::bulk("A"), Frame::Null]),
                ),
            ],
        );
        assert_eq!(
            merged,
            Frame::Array(vec![Frame::bulk("A"), Frame::bulk("B"), Frame::Null])
        );
        let merged = merge(
            &words("DEL a b"),
            2,
            vec![(vec![0], Frame::Integer(1)), (vec![1], Frame::Integer(1))],
        );
        assert_eq!(merged, Frame::Integer(2));
    }

    #[test]
    fn glob_matches() {
        assert!(glob(b"*", b"save"));
        assert!(glob(b"max*", b"maxmemory"));
        assert!(glob(b"s?ve", b"save"));
        assert!(!glob(b"save", b"saves"));
    }
}
