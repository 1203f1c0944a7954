//! The Redis commands, executed against one node's [`Store`]: one function per command
//! family, dispatched by [`execute`], replies and error texts as Redis writes them. Pure: the
//! time and the node's identity are passed in. Which node a command runs on is decided by
//! [`route`] (single-key commands go to the key's owner, multi-key ones are split by the
//! caller with [`split`] and their partial replies merged with [`merge`]).

use smallvec::SmallVec;

use crate::number::parse_i64;
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

/// An argument as Redis' C code sees it where it compares it with `strcasecmp` or prints it
/// with `%s` (options, names in error texts): up to its first NUL byte.
fn c_str(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// Whether argument `arg` is option `want` (upper case), compared as Redis compares options.
fn is_opt(arg: &[u8], want: &str) -> bool {
    c_str(arg).eq_ignore_ascii_case(want.as_bytes())
}

/// An error reply quoting client bytes, as they came (UTF-8 or not) except CR and LF:
/// Redis trims them from both ends of the message, then turns the others into spaces, so
/// the reply stays one line (`addReplyErrorFormat`).
fn err_quoting(parts: &[&[u8]]) -> Frame {
    let msg = parts.concat();
    let is_eol = |b: &u8| *b == b'\r' || *b == b'\n';
    let start = msg.iter().position(|b| !is_eol(b)).unwrap_or(msg.len());
    let end = msg
        .iter()
        .rposition(|b| !is_eol(b))
        .map_or(start, |i| i + 1);
    Frame::Error(
        msg[start..end]
            .iter()
            .map(|&b| if is_eol(&b) { b' ' } else { b })
            .collect(),
    )
}

/// The current time as Redis holds it (signed milliseconds), for its overflow checks.
fn now_i64(now: u64) -> i64 {
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// Redis' reply to an unknown command: the name (up to 128 bytes) and the arguments quoted
/// one after the other while the quoted text is shorter than 128 bytes, the last one cut
/// to fit (`processCommand`).
fn unknown(cmd: &[&[u8]]) -> Frame {
    const ROOM: usize = 128;
    let mut args: Vec<u8> = Vec::new();
    for a in cmd.iter().skip(1) {
        if args.len() >= ROOM {
            break;
        }
        let a = c_str(a);
        let take = a.len().min(ROOM - args.len());
        args.push(b'\'');
        args.extend_from_slice(&a[..take]);
        args.extend_from_slice(b"' ");
    }
    let name = c_str(cmd.first().copied().unwrap_or_default());
    let name = &name[..name.len().min(ROOM)];
    err_quoting(&[
        b"ERR unknown command '",
        name,
        b"', with args beginning with: ",
        &args,
    ])
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
        "SETEX" | "PSETEX" => setex(store, name, cmd, now),
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
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => incr(store, name, cmd, now),
        "APPEND" => match store.append(key, cmd[2], now) {
            Ok(n) => Outcome::wrote(Frame::Integer(n as i64), key),
            Err(e) => Outcome::reply(store_err(e)),
        },
        "STRLEN" => Outcome::reply(Frame::Integer(store.strlen(key, now) as i64)),
        _ => Outcome::reply(unknown(cmd)),
    }
}

/// INCR, DECR, INCRBY, DECRBY. The argument is checked before the stored value, as Redis
/// does, and an error leaves the key as it was (value and TTL).
fn incr<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let by = match name {
        "INCR" => 1,
        "DECR" => -1,
        _ => match (name, parse_i64(cmd[2])) {
            (_, None) => return Outcome::reply(not_int()),
            ("INCRBY", Some(n)) => n,
            // -i64::MIN does not exist; Redis says so with its own text.
            (_, Some(n)) => match n.checked_neg() {
                Some(n) => n,
                None => return Outcome::reply(Frame::err("ERR decrement would overflow")),
            },
        },
    };
    match store.incr_by(cmd[1], by, now) {
        Ok(n) => Outcome::wrote(Frame::Integer(n), cmd[1]),
        Err(e) => Outcome::reply(store_err(e)),
    }
}

fn expire_err(name: &str) -> Frame {
    Frame::err(format!(
        "ERR invalid expire time in '{}' command",
        name.to_ascii_lowercase()
    ))
}

/// The absolute deadline (ms) asked by SET's `EX`/`PX`/`EXAT`/`PXAT` (`unit`) argument, or
/// SETEX's (`EX`) and PSETEX's (`PX`), checked as Redis' `getExpireMillisecondsOrReply`
/// does: an integer, positive, and in signed 64-bit milliseconds once converted and, for
/// the relative ones, added to now. `cmd` names the command in the error.
fn set_deadline(unit: &str, arg: &[u8], now: u64, cmd: &str) -> Result<u64, Frame> {
    let n = parse_i64(arg).ok_or_else(not_int)?;
    let seconds = matches!(unit, "EX" | "EXAT");
    if n <= 0 || (seconds && n > i64::MAX / 1000) {
        return Err(expire_err(cmd));
    }
    let ms = if seconds { n * 1000 } else { n };
    let at = if matches!(unit, "EX" | "PX") {
        ms.checked_add(now_i64(now))
    } else {
        Some(ms)
    };
    // Positive whenever it exists: `ms` is, and so is now.
    at.and_then(|t| u64::try_from(t).ok())
        .ok_or_else(|| expire_err(cmd))
}

/// SETEX key seconds value, PSETEX key ms value.
fn setex<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let unit = if name == "SETEX" { "EX" } else { "PX" };
    let at = match set_deadline(unit, cmd[2], now, name) {
        Ok(at) => at,
        Err(e) => return Outcome::reply(e),
    };
    let opts = SetOptions {
        expire_at: Some(at),
        ..Default::default()
    };
    match store.set(cmd[1], cmd[3], opts, now) {
        Ok(_) => Outcome::wrote(Frame::ok(), cmd[1]),
        Err(e) => Outcome::reply(store_err(e)),
    }
}

/// The expiry SET was given. The time argument is kept as text: Redis reads it only once
/// every option parsed, so a syntax error anywhere wins over a bad number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SetExpiry<'a> {
    None,
    KeepTtl,
    /// `EX`, `PX`, `EXAT` or `PXAT`, and its argument.
    Time(&'static str, &'a [u8]),
}

impl SetExpiry<'_> {
    /// Whether an option of kind `unit` (`None`: KEEPTTL) may follow: the expiry options
    /// exclude each other, but each may repeat (the last one wins).
    fn allows(&self, unit: Option<&str>) -> bool {
        match (self, unit) {
            (SetExpiry::None, _) | (SetExpiry::KeepTtl, None) => true,
            (SetExpiry::Time(u, _), Some(v)) => *u == v,
            _ => false,
        }
    }
}

/// SET's options, parsed as Redis' `parseExtendedStringArgumentsOrReply` does: NX excludes
/// XX, GET goes with anything, an expiry option needs an argument after it; any other word
/// is a syntax error.
fn set_options<'a>(args: &[&'a [u8]]) -> Result<(SetOptions, SetExpiry<'a>), Frame> {
    let mut opts = SetOptions::default();
    let mut expiry = SetExpiry::None;
    let mut i = 0;
    while let Some(&a) = args.get(i) {
        let unit = ["EX", "PX", "EXAT", "PXAT"]
            .into_iter()
            .find(|u| is_opt(a, u));
        if is_opt(a, "NX") && !opts.xx {
            opts.nx = true;
        } else if is_opt(a, "XX") && !opts.nx {
            opts.xx = true;
        } else if is_opt(a, "GET") {
            opts.get = true;
        } else if is_opt(a, "KEEPTTL") && expiry.allows(None) {
            expiry = SetExpiry::KeepTtl;
        } else if let (Some(u), Some(&arg)) = (unit, args.get(i + 1)) {
            if !expiry.allows(Some(u)) {
                return Err(syntax());
            }
            expiry = SetExpiry::Time(u, arg);
            i += 1;
        } else {
            return Err(syntax());
        }
        i += 1;
    }
    Ok((opts, expiry))
}

/// SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]
fn set<'a>(store: &mut Store, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let key = cmd[1];
    let parsed = set_options(&cmd[3..]).and_then(|(mut opts, expiry)| {
        match expiry {
            SetExpiry::None => {}
            SetExpiry::KeepTtl => opts.keep_ttl = true,
            SetExpiry::Time(unit, arg) => {
                opts.expire_at = Some(set_deadline(unit, arg, now, "set")?)
            }
        }
        Ok(opts)
    });
    let opts = match parsed {
        Ok(opts) => opts,
        Err(e) => return Outcome::reply(e),
    };
    match store.set(key, cmd[2], opts, now) {
        Err(e) => Outcome::reply(store_err(e)),
        Ok(o) => {
            let reply = match (opts.get, o.written) {
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

/// EXPIRE's NX/XX/GT/LT flags.
#[derive(Debug, Default, Clone, Copy)]
struct ExpireFlags {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
}

impl ExpireFlags {
    /// Parsed as Redis' `parseExtendedExpireArgumentsOrReply` does, before the time
    /// argument is read (so a bad flag wins over a bad number, and over a missing key).
    fn parse(args: &[&[u8]]) -> Result<ExpireFlags, Frame> {
        let mut f = ExpireFlags::default();
        for a in args {
            if is_opt(a, "NX") {
                f.nx = true;
            } else if is_opt(a, "XX") {
                f.xx = true;
            } else if is_opt(a, "GT") {
                f.gt = true;
            } else if is_opt(a, "LT") {
                f.lt = true;
            } else {
                return Err(err_quoting(&[b"ERR Unsupported option ", c_str(a)]));
            }
        }
        if f.nx && (f.xx || f.gt || f.lt) {
            return Err(Frame::err(
                "ERR NX and XX, GT or LT options at the same time are not compatible",
            ));
        }
        if f.gt && f.lt {
            return Err(Frame::err(
                "ERR GT and LT options at the same time are not compatible",
            ));
        }
        Ok(f)
    }

    /// Whether deadline `when` may replace `current` (`None`: the key does not expire,
    /// which GT counts as infinitely far and LT as later than anything).
    fn allow(&self, when: i64, current: Option<i64>) -> bool {
        !((self.nx && current.is_some())
            || (self.xx && current.is_none())
            || (self.gt && current.is_none_or(|c| when <= c))
            || (self.lt && current.is_some_and(|c| when >= c)))
    }
}

/// The deadline (signed ms, possibly in the past) EXPIRE and friends ask for, refused as
/// Redis refuses it: when it does not fit in signed 64-bit milliseconds once converted from
/// seconds and, for the relative ones, added to now. Negative times are accepted (the key
/// is deleted).
fn expire_deadline(name: &str, arg: &[u8], now: u64) -> Result<i64, Frame> {
    let n = parse_i64(arg).ok_or_else(not_int)?;
    let ms = if matches!(name, "EXPIRE" | "EXPIREAT") {
        n.checked_mul(1000)
    } else {
        Some(n)
    };
    let base = if matches!(name, "EXPIRE" | "PEXPIRE") {
        now_i64(now)
    } else {
        0
    };
    ms.and_then(|ms| ms.checked_add(base))
        .ok_or_else(|| expire_err(name))
}

/// EXPIRE key seconds [NX|XX|GT|LT] and friends.
fn expire<'a>(store: &mut Store, name: &str, cmd: &[&'a [u8]], now: u64) -> Outcome<'a> {
    let key = cmd[1];
    let flags = match ExpireFlags::parse(&cmd[3..]) {
        Ok(f) => f,
        Err(e) => return Outcome::reply(e),
    };
    let when = match expire_deadline(name, cmd[2], now) {
        Ok(w) => w,
        Err(e) => return Outcome::reply(e),
    };
    let current = match store.ttl(key, now) {
        Ttl::Missing => return Outcome::reply(Frame::Integer(0)),
        Ttl::Persistent => None,
        Ttl::Ms(ms) => Some(now_i64(now).saturating_add(now_i64(ms))),
    };
    if !flags.allow(when, current) {
        return Outcome::reply(Frame::Integer(0));
    }
    // A deadline not after now deletes the key (still a 1, as in Redis).
    store.set_expiry(key, Some(u64::try_from(when).unwrap_or(0)), now);
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
        "SELECT" if n == 2 => select(cmd[1]),
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
            // RESP3 (HELLO 3) is not spoken here: refused as Redis refuses versions it lacks.
            Some(Some(_)) => Frame::err("NOPROTO unsupported protocol version"),
            Some(None) => Frame::err("ERR Protocol version is not an integer or out of range"),
        },
        "INFO" => Frame::Bulk(info(store, env).into_bytes()),
        "DBSIZE" | "PING" | "ECHO" | "SELECT" | "CONFIG" | "CLIENT" => wrong_args(name),
        _ => unknown(cmd),
    };
    Outcome::reply(reply)
}

/// SELECT index: an integer in C `int` range (Redis' `getIntFromObjectOrReply`), and only
/// database 0 exists here.
fn select(arg: &[u8]) -> Frame {
    match parse_i64(arg).map(i32::try_from) {
        None => not_int(),
        Some(Err(_)) => {
            Frame::err("ERR value is out of range, value must between -2147483648 and 2147483647")
        }
        Some(Ok(0)) => Frame::ok(),
        Some(Ok(_)) => Frame::err("ERR DB index is out of range"),
    }
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

    /// Scripts of (command, expected reply) run in order on one store, at time 1000.
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
            ("HELLO 3", e("NOPROTO unsupported protocol version")),
            ("QUIT", ok.clone()),
            (
                "FOO a b",
                e("ERR unknown command 'FOO', with args beginning with: 'a' 'b' "),
            ),
        ];
        let mut s = Store::new(StoreConfig::default());
        run_script(&mut s, &script, 1000);
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

    /// Run `script` (command, expected reply) in order on one store at time `now`, with
    /// `words` splitting each command.
    fn run_script(s: &mut Store, script: &[(&str, Frame)], now: u64) {
        for (i, (cmd, want)) in script.iter().enumerate() {
            let out = execute(s, &words(cmd), now, &env());
            assert_eq!(&out.reply, want, "step {i}: {cmd}");
        }
    }

    /// 2023-11-14, in ms: what redis-server's clock read when the replies below were taken.
    const NOW: u64 = 1_700_000_000_000;

    /// The three sequences of issue 15 where the cache used to read a non-canonical number:
    /// each INCR/DECR is refused as redis-server 7.0 refuses it, and leaves the value and its
    /// TTL as they were.
    #[test]
    fn non_canonical_integers_are_refused_and_change_nothing() {
        let not_int = Frame::err("ERR value is not an integer or out of range");
        let cases: [(&[&str], &str, &str); 3] = [
            (&["SET k 041"], "INCR k", "041"),
            (&["SET k 0", "APPEND k 1"], "INCR k", "01"),
            (&["SET k 01"], "DECR k", "01"),
        ];
        for (setup, cmd, value) in cases {
            let mut s = Store::new(StoreConfig::default());
            for c in setup {
                execute(&mut s, &words(c), NOW, &env());
            }
            execute(&mut s, &words("PEXPIRE k 100000"), NOW, &env());
            let out = execute(&mut s, &words(cmd), NOW, &env());
            assert_eq!(out.reply, not_int, "{setup:?} then {cmd}");
            assert!(out.written.is_empty(), "{cmd} replicated nothing");
            let got = execute(&mut s, &words("GET k"), NOW, &env()).reply;
            assert_eq!(got, Frame::bulk(value), "{setup:?} then {cmd}");
            let ttl = execute(&mut s, &words("PTTL k"), NOW, &env()).reply;
            assert_eq!(ttl, Frame::Integer(100_000), "{cmd} kept the TTL");
        }
    }

    /// Replies taken from redis-server 7.0.15 with redis-cli (issue 15): integer arguments
    /// and values, overflow, expire times, option parsing order.
    #[test]
    fn answers_as_redis_7() {
        use Frame::*;
        let e = |s: &str| Error(s.into());
        let b = |s: &str| Bulk(s.as_bytes().to_vec());
        let ok = Frame::ok();
        let not_int = || e("ERR value is not an integer or out of range");
        let overflow = || e("ERR increment or decrement would overflow");
        let bad_time = |c: &str| e(&format!("ERR invalid expire time in '{c}' command"));
        let script: Vec<(&str, Frame)> = vec![
            ("SET k -0", ok.clone()),
            ("INCR k", not_int()),
            ("SET k +1", ok.clone()),
            ("INCR k", not_int()),
            ("SET k 00000000000000000001", ok.clone()),
            ("INCR k", not_int()),
            ("SET k 1.5", ok.clone()),
            ("INCR k", not_int()),
            ("SET k 9223372036854775807", ok.clone()),
            ("INCR k", overflow()),
            ("GET k", b("9223372036854775807")),
            ("SET k -9223372036854775808", ok.clone()),
            ("DECR k", overflow()),
            ("INCRBY k -1", overflow()),
            ("DECRBY k 1", overflow()),
            ("GET k", b("-9223372036854775808")),
            ("DEL k", Integer(1)),
            ("INCRBY k 9223372036854775807", Integer(i64::MAX)),
            ("INCRBY k 1", overflow()),
            ("DEL k", Integer(1)),
            (
                "DECRBY k -9223372036854775808",
                e("ERR decrement would overflow"),
            ),
            ("GET k", Null),
            ("SET k 5", ok.clone()),
            (
                "DECRBY k 9223372036854775807",
                Integer(-9223372036854775802),
            ),
            ("DECRBY k 9223372036854775808", not_int()),
            ("INCRBY k 041", not_int()),
            ("INCRBY k -0", not_int()),
            ("INCRBY k +1", not_int()),
            ("INCRBY k 00", not_int()),
            ("INCRBY k 1e3", not_int()),
            // SET: options first (syntax), then the time.
            ("SET k v EX 1 EX 100", ok.clone()),
            ("TTL k", Integer(100)),
            ("SET k v EX 100 PX 5", e("ERR syntax error")),
            ("SET k v NX NX", Null),
            ("SET k v2 XX XX GET GET", b("v")),
            ("TTL k", Integer(-1)),
            ("EXPIRE k 100", Integer(1)),
            ("SET k v KEEPTTL KEEPTTL", ok.clone()),
            ("TTL k", Integer(100)),
            ("SET k v KEEPTTL EX 10", e("ERR syntax error")),
            ("SET k v EX 10 KEEPTTL", e("ERR syntax error")),
            ("SET k v EX", e("ERR syntax error")),
            ("SET k v EX x BOGUS", e("ERR syntax error")),
            ("SET k v NX XX EX x", e("ERR syntax error")),
            ("SET k v EX 0", bad_time("set")),
            ("SET k v EX -1", bad_time("set")),
            ("SET k v EX 01", not_int()),
            ("SET k v EX 9223372036854775", bad_time("set")),
            ("SET k v EX 9223372036854776", bad_time("set")),
            ("SET k v EX 9223372036854774", bad_time("set")),
            ("SET k v PX 9223372036854775807", bad_time("set")),
            ("SET k v PX 9223370000000000000", ok.clone()),
            ("TTL k", Integer(9223370000000000)),
            ("SET k v EXAT 9223372036854776", bad_time("set")),
            ("SET k v PXAT 9223372036854775807", ok.clone()),
            ("PTTL k", Integer(i64::MAX - NOW as i64)),
            ("SET k v EXAT 1", ok.clone()),
            ("GET k", Null),
            ("SET k v NX GET", Null),
            ("SET k w NX GET", b("v")),
            ("GET k", b("v")),
            ("SET nn v XX GET", Null),
            ("GET nn", Null),
            ("SETEX k 0 v", bad_time("setex")),
            ("SETEX k 9223372036854775 v", bad_time("setex")),
            ("SETEX k 9223372036854774 v", bad_time("setex")),
            ("SETEX k 01 v", not_int()),
            ("PSETEX k 9223372036854775807 v", bad_time("psetex")),
            ("PSETEX k 0 v", bad_time("psetex")),
            ("GET k", b("v")),
            // EXPIRE: flags first, then the time, then the key.
            (
                "EXPIRE k 10 NX XX",
                e("ERR NX and XX, GT or LT options at the same time are not compatible"),
            ),
            (
                "EXPIRE k 10 GT LT",
                e("ERR GT and LT options at the same time are not compatible"),
            ),
            ("EXPIRE k 10 foo", e("ERR Unsupported option foo")),
            ("EXPIRE k x foo", e("ERR Unsupported option foo")),
            ("EXPIRE nokey 10 bogus", e("ERR Unsupported option bogus")),
            ("EXPIRE nokey x", not_int()),
            ("EXPIRE k 9223372036854775", bad_time("expire")),
            ("EXPIRE k -9223372036854775808", bad_time("expire")),
            ("EXPIRE k -9223372036854776", bad_time("expire")),
            ("PEXPIRE k 9223372036854775807", bad_time("pexpire")),
            ("EXPIREAT k 9223372036854776", bad_time("expireat")),
            ("GET k", b("v")),
            ("EXPIRE k -9223372036854775", Integer(1)),
            ("TTL k", Integer(-2)),
            ("SET k v", ok.clone()),
            ("PEXPIRE k -9223372036854775808", Integer(1)),
            ("EXISTS k", Integer(0)),
            ("SET k v", ok.clone()),
            ("PEXPIREAT k 9223372036854775807", Integer(1)),
            ("PTTL k", Integer(i64::MAX - NOW as i64)),
            ("SET k v", ok.clone()),
            ("PEXPIRE k 100000 GT", Integer(0)),
            ("PEXPIRE k 100000 LT", Integer(1)),
            ("PEXPIRE k 100000 NX", Integer(0)),
            ("EXPIRE k 100 XX GT", Integer(0)),
            ("EXPIRE k 101 XX GT", Integer(1)),
            ("PERSIST k", Integer(1)),
            ("EXPIRE k 5 XX", Integer(0)),
            ("EXPIRE k 5 lt", Integer(1)),
            ("TTL k", Integer(5)),
            ("EXPIRE k -1 GT", Integer(0)),
            ("EXPIRE k -1 LT", Integer(1)),
            ("EXISTS k", Integer(0)),
            // Server commands.
            ("SELECT 16", e("ERR DB index is out of range")),
            ("SELECT -1", e("ERR DB index is out of range")),
            (
                "SELECT 2147483648",
                e("ERR value is out of range, value must between -2147483648 and 2147483647"),
            ),
            ("SELECT 00", not_int()),
            ("HELLO 4", e("NOPROTO unsupported protocol version")),
            ("HELLO 1", e("NOPROTO unsupported protocol version")),
            (
                "HELLO x",
                e("ERR Protocol version is not an integer or out of range"),
            ),
            (
                "foo",
                e("ERR unknown command 'foo', with args beginning with: "),
            ),
        ];
        let mut s = Store::new(StoreConfig::default());
        // At a realistic time: the overflow checks add now, as Redis does.
        run_script(&mut s, &script, NOW);
    }

    /// Options and names as Redis' C code reads them: up to a NUL byte; error texts keep one
    /// line; an unknown command's arguments are quoted up to 128 bytes.
    #[test]
    fn c_strings_and_error_texts() {
        let mut s = Store::new(StoreConfig::default());
        let run = |s: &mut Store, cmd: &[&[u8]]| execute(s, cmd, NOW, &env()).reply;
        assert_eq!(run(&mut s, &[b"SET", b"q", b"v"]), Frame::ok());
        assert_eq!(run(&mut s, &[b"SET", b"q", b"w", b"XX\0"]), Frame::ok());
        assert_eq!(
            run(&mut s, &[b"EXPIRE", b"q", b"10", b"fo\0ox"]),
            Frame::err("ERR Unsupported option fo")
        );
        assert_eq!(
            run(&mut s, &[b"FO\0", b"a", b"b\0c"]),
            Frame::err("ERR unknown command 'FO', with args beginning with: 'a' 'b' ")
        );
        assert_eq!(
            run(&mut s, &[b"FOO", b"a\rx", b"b\nc"]),
            Frame::err("ERR unknown command 'FOO', with args beginning with: 'a x' 'b c' ")
        );
        let (x, y) = ("x".repeat(100), "y".repeat(100));
        let cmd: [&[u8]; 4] = [b"foo", x.as_bytes(), y.as_bytes(), b"c"];
        let want = format!(
            "ERR unknown command 'foo', with args beginning with: '{x}' '{}' ",
            "y".repeat(25)
        );
        assert_eq!(run(&mut s, &cmd), Frame::err(want));
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
