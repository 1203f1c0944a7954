//! The cache store of one node, pure: string values, TTLs, memory accounting and eviction.
//! Time (`now_ms`, milliseconds since the Unix epoch) is passed in by the caller; randomness
//! comes from a small seeded generator owned by the store, so tests are deterministic.
//!
//! Expiry is lazy (a key read after its deadline is removed and counts as a miss) and active
//! ([`Store::active_expire`] samples keys that have a TTL and removes the expired ones, like
//! Redis' `activeExpireCycle`). Memory is accounted approximately per entry (key, value and
//! a fixed overhead); when a write would take the store above `maxmemory`, entries are
//! evicted by the configured [`Policy`] using sampling, as Redis does: `allkeys-lru` drops
//! the least recently used of N sampled keys, `allkeys-lfu` the least frequently used by an
//! 8-bit logarithmic counter that decays over time, `volatile-ttl` the sampled key with a TTL
//! closest to expiry, and `noeviction` refuses the write with an OOM error.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};
use indexmap::IndexSet;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::number::parse_i64;

/// A key as the store holds it: up to 24 bytes inline, so a lookup compares the key in the
/// map's own entry instead of following a pointer to a separate allocation (one cache miss
/// less per lookup on a large map, and no allocation per short key).
type Key = SmallVec<[u8; 24]>;

/// Bytes counted per entry besides its key and value (map slots, metadata).
pub const ENTRY_OVERHEAD: usize = 64;

/// What to do when memory is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Evict the least recently used key (sampled).
    #[default]
    AllkeysLru,
    /// Evict the least frequently used key (sampled, decaying counter).
    AllkeysLfu,
    /// Evict the key with a TTL nearest to expiry (sampled among keys with a TTL).
    VolatileTtl,
    /// Refuse writes.
    Noeviction,
}

impl Policy {
    /// The Redis name (`allkeys-lru`...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::AllkeysLru => "allkeys-lru",
            Policy::AllkeysLfu => "allkeys-lfu",
            Policy::VolatileTtl => "volatile-ttl",
            Policy::Noeviction => "noeviction",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "allkeys-lru" => Policy::AllkeysLru,
            "allkeys-lfu" => Policy::AllkeysLfu,
            "volatile-ttl" => Policy::VolatileTtl,
            "noeviction" => Policy::Noeviction,
            _ => return Err(format!("unknown eviction policy `{s}`")),
        })
    }
}

/// Errors of store operations. The messages are Redis' reply texts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write does not fit and the policy cannot make room.
    #[error("OOM command not allowed when used memory > 'maxmemory'.")]
    Oom,
    /// A value or argument that is not the canonical form of a 64-bit integer.
    #[error("ERR value is not an integer or out of range")]
    NotInteger,
    /// INCRBY would overflow.
    #[error("ERR increment or decrement would overflow")]
    Overflow,
    /// The value would exceed the largest allowed string.
    #[error("ERR string exceeds maximum allowed size (proto-max-bulk-len)")]
    TooLarge,
}

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Memory limit in bytes (0: unlimited).
    pub maxmemory: usize,
    /// Eviction policy.
    pub policy: Policy,
    /// Keys sampled per eviction (Redis' `maxmemory-samples`, default 5).
    pub samples: usize,
    /// Largest value.
    pub max_value: usize,
    /// LFU: higher means the counter grows more slowly (Redis `lfu-log-factor`, 10).
    pub lfu_log_factor: u32,
    /// LFU: minutes after which the counter is halved... decremented by one (Redis
    /// `lfu-decay-time`, 1), here in milliseconds.
    pub lfu_decay_ms: u64,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            maxmemory: 64 * 1024 * 1024,
            policy: Policy::AllkeysLru,
            samples: 5,
            max_value: 512 * 1024 * 1024,
            lfu_log_factor: 10,
            lfu_decay_ms: 60_000,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    /// Reads that found a key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Keys evicted to make room.
    pub evictions: u64,
    /// Keys removed because their TTL passed.
    pub expired: u64,
}

/// Remaining time to live of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// No such key.
    Missing,
    /// The key does not expire.
    Persistent,
    /// Milliseconds left.
    Ms(u64),
}

/// Condition and options of [`Store::set`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Absolute expiry (ms since epoch), or none.
    pub expire_at: Option<u64>,
    /// Keep the key's current TTL (KEEPTTL).
    pub keep_ttl: bool,
    /// Only if the key does not exist (NX).
    pub nx: bool,
    /// Only if the key exists (XX).
    pub xx: bool,
    /// Return the previous value (GET); without it [`SetOutcome::old`] is `None`.
    pub get: bool,
}

/// What [`Store::set`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOutcome {
    /// The write happened (false when NX/XX did not hold).
    pub written: bool,
    /// The previous value, when [`SetOptions::get`] asked for it.
    pub old: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    expire_at: Option<u64>,
    last_access: u64,
    lfu_touched: u64,
    /// This key's position in [`Store::hashes`].
    pos: u32,
    lfu: u8,
}

/// A key and its entry, as the table holds them: a lookup reads one slot (after the table's
/// control bytes), with the key inline for the comparison.
#[derive(Debug, Clone)]
struct Slot {
    key: Key,
    e: Entry,
}

const LFU_INIT: u8 = 5;

/// One node's cache.
#[derive(Debug)]
pub struct Store {
    cfg: StoreConfig,
    table: HashTable<Slot>,
    /// hashbrown's default: foldhash, seeded per process. A third of the cost of SipHash
    /// here (two hashes per replicated write), and seeded, so clients cannot aim keys at
    /// one bucket chain without knowing the seed.
    hasher: DefaultHashBuilder,
    /// The hash of every key held, in no particular order; [`Entry::pos`] is where its key's
    /// is. Eviction samples random positions here (a key is found again from its hash and
    /// position), which a hash table alone cannot do.
    hashes: Vec<u64>,
    volatile: IndexSet<Key>,
    used: usize,
    stats: StoreStats,
    rng: u64,
}

fn cost(key: &[u8], value: &[u8], volatile: bool) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD + if volatile { key.len() + 16 } else { 0 }
}

/// Redis' LFU: decay the counter by the periods elapsed since it was last touched, then a
/// logarithmic increment (`r` is a uniform draw in 0..1); also the LRU clock.
fn touch(e: &mut Entry, now: u64, r: f64, factor: f64, decay: u64) {
    e.last_access = now;
    let periods = now
        .saturating_sub(e.lfu_touched)
        .checked_div(decay)
        .unwrap_or(0);
    let mut c = e.lfu.saturating_sub(periods.min(255) as u8);
    if c < 255 {
        let base = c.saturating_sub(LFU_INIT) as f64;
        if r < 1.0 / (base * factor + 1.0) {
            c += 1;
        }
    }
    e.lfu = c;
    e.lfu_touched = now;
}

impl Store {
    /// An empty store.
    pub fn new(cfg: StoreConfig) -> Store {
        Store {
            rng: cfg.seed | 1,
            cfg,
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            hashes: Vec::new(),
            volatile: IndexSet::new(),
            used: 0,
            stats: StoreStats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Change the memory limit and policy (takes effect at the next write).
    pub fn reconfigure(&mut self, maxmemory: usize, policy: Policy) {
        self.cfg.maxmemory = maxmemory;
        self.cfg.policy = policy;
    }

    /// Keys held (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Keys with a TTL.
    pub fn volatile_len(&self) -> usize {
        self.volatile.len()
    }

    /// Approximate bytes used.
    pub fn used_memory(&self) -> usize {
        self.used
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn rand_f64(&mut self) -> f64 {
        (self.rand() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Touch the entry of `key` (found at hash `h`).
    fn touch_key(&mut self, h: u64, key: &[u8], now: u64) {
        let r = self.rand_f64();
        let (factor, decay) = (self.cfg.lfu_log_factor as f64, self.cfg.lfu_decay_ms);
        if let Some(s) = self.table.find_mut(h, |s| s.key.as_slice() == key) {
            touch(&mut s.e, now, r, factor, decay);
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn find(&self, h: u64, key: &[u8]) -> Option<&Entry> {
        self.table
            .find(h, |s| s.key.as_slice() == key)
            .map(|s| &s.e)
    }

    fn remove_entry(&mut self, key: &[u8]) -> Option<Entry> {
        self.remove_at(self.hash(key), key)
    }

    /// Remove `key` (hash `h`) and everything that points at it.
    fn remove_at(&mut self, h: u64, key: &[u8]) -> Option<Entry> {
        let Ok(found) = self.table.find_entry(h, |s| s.key.as_slice() == key) else {
            return None;
        };
        let (slot, _) = found.remove();
        self.unlink(slot.e.pos as usize);
        let vol = slot.e.expire_at.is_some();
        if vol {
            self.volatile.swap_remove(slot.key.as_slice());
        }
        self.used = self
            .used
            .saturating_sub(cost(&slot.key, &slot.e.value, vol));
        Some(slot.e)
    }

    /// Take position `pos` out of `hashes`: the last key's hash moves into it, and that
    /// key's entry learns its new position.
    fn unlink(&mut self, pos: usize) {
        let last = self.hashes.len().wrapping_sub(1);
        if pos > last {
            return;
        }
        self.hashes.swap_remove(pos);
        if pos < last {
            let h = self.hashes[pos];
            if let Some(s) = self.table.find_mut(h, |s| s.e.pos as usize == last) {
                s.e.pos = pos as u32;
            }
        }
    }

    /// The entry at position `pos` of `hashes`.
    fn at(&self, pos: usize) -> Option<&Slot> {
        let h = *self.hashes.get(pos)?;
        self.table.find(h, |s| s.e.pos as usize == pos)
    }

    /// Whether `key` (hash `h`) is held and not expired; an expired entry is removed (and
    /// counted). The hot paths (GET, SET) look a key up once here; finding it again right
    /// after reads the same, now cached, slot.
    fn live(&mut self, h: u64, key: &[u8], now: u64) -> bool {
        match self.find(h, key) {
            None => false,
            Some(e) if e.expire_at.is_some_and(|t| t <= now) => {
                self.remove_at(h, key);
                self.stats.expired += 1;
                false
            }
            Some(_) => true,
        }
    }

    /// Remove `key` if its TTL passed; true if it did.
    fn expire_if_due(&mut self, key: &[u8], now: u64) -> bool {
        let h = self.hash(key);
        self.find(h, key).is_some() && !self.live(h, key, now)
    }

    fn lfu_decayed(&self, e: &Entry, now: u64) -> u8 {
        if self.cfg.lfu_decay_ms == 0 {
            return e.lfu;
        }
        let periods = now.saturating_sub(e.lfu_touched) / self.cfg.lfu_decay_ms;
        e.lfu.saturating_sub(periods.min(255) as u8)
    }

    /// Make room for `extra` more bytes; `protect` is the key being written (never evicted).
    fn make_room(&mut self, extra: usize, protect: &[u8], now: u64) -> Result<(), StoreError> {
        let max = self.cfg.maxmemory;
        if max == 0 {
            return Ok(());
        }
        while self.used.saturating_add(extra) > max {
            if self.cfg.policy == Policy::Noeviction {
                return Err(StoreError::Oom);
            }
            let Some(victim) = self.pick_victim(protect, now) else {
                return Err(StoreError::Oom);
            };
            self.remove_entry(&victim);
            self.stats.evictions += 1;
        }
        Ok(())
    }

    /// Sampled indices: every key when there are no more than `samples`.
    fn sample(&mut self, len: usize) -> Vec<usize> {
        let n = self.cfg.samples.max(1);
        if len <= n {
            (0..len).collect()
        } else {
            (0..n)
                .map(|_| (self.rand() % len as u64) as usize)
                .collect()
        }
    }

    fn pick_victim(&mut self, protect: &[u8], now: u64) -> Option<Vec<u8>> {
        match self.cfg.policy {
            Policy::Noeviction => None,
            Policy::VolatileTtl => {
                let idx = self.sample(self.volatile.len());
                idx.into_iter()
                    .filter_map(|i| self.volatile.get_index(i))
                    .filter(|k| k.as_slice() != protect)
                    .filter_map(|k| Some((self.find(self.hash(k), k)?.expire_at?, k)))
                    .min_by_key(|(t, _)| *t)
                    .map(|(_, k)| k.to_vec())
            }
            Policy::AllkeysLru | Policy::AllkeysLfu => {
                let lfu = self.cfg.policy == Policy::AllkeysLfu;
                let idx = self.sample(self.hashes.len());
                idx.into_iter()
                    .filter_map(|i| self.at(i))
                    .filter(|s| s.key.as_slice() != protect)
                    .map(|s| {
                        let score = if lfu {
                            (self.lfu_decayed(&s.e, now) as u64, s.e.last_access)
                        } else {
                            (s.e.last_access, 0)
                        };
                        (score, &s.key)
                    })
                    .min_by_key(|(s, _)| *s)
                    .map(|(_, k)| k.to_vec())
            }
        }
    }

    /// Read `key`, counting a hit or a miss.
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<Vec<u8>> {
        let h = self.hash(key);
        if !self.live(h, key, now) {
            self.stats.misses += 1;
            return None;
        }
        self.stats.hits += 1;
        self.touch_key(h, key, now);
        self.find(h, key).map(|e| e.value.clone())
    }

    /// Whether `key` exists (not counted as a hit or miss).
    pub fn exists(&mut self, key: &[u8], now: u64) -> bool {
        let h = self.hash(key);
        self.live(h, key, now)
    }

    /// The value and absolute expiry of `key`, without touching it (for replication).
    pub fn peek(&mut self, key: &[u8], now: u64) -> Option<(&[u8], Option<u64>)> {
        let h = self.hash(key);
        if !self.live(h, key, now) {
            return None;
        }
        self.find(h, key).map(|e| (e.value.as_slice(), e.expire_at))
    }

    /// Write `value` under `key` according to `opts`.
    pub fn set(
        &mut self,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
        now: u64,
    ) -> Result<SetOutcome, StoreError> {
        if value.len() > self.cfg.max_value {
            return Err(StoreError::TooLarge);
        }
        let h = self.hash(key);
        let exists = self.live(h, key, now);
        if (opts.nx && exists) || (opts.xx && !exists) {
            let old = if opts.get {
                self.find(h, key).map(|e| e.value.clone())
            } else {
                None
            };
            return Ok(SetOutcome {
                written: false,
                old,
            });
        }
        let expire_at = if opts.keep_ttl {
            self.find(h, key).and_then(|e| e.expire_at)
        } else {
            opts.expire_at
        };
        let old = self.put_at(h, key, value, expire_at, now, opts.get)?;
        Ok(SetOutcome { written: true, old })
    }

    /// Store `value` with absolute expiry `expire_at`, evicting as needed. An expiry in the
    /// past deletes the key.
    pub fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        expire_at: Option<u64>,
        now: u64,
    ) -> Result<(), StoreError> {
        let h = self.hash(key);
        self.put_at(h, key, value, expire_at, now, false)
            .map(|_| ())
    }

    /// [`Store::put`] for a key whose hash is `h`: replaces the value in place when the
    /// key is held. Returns the old value if `keep_old`.
    fn put_at(
        &mut self,
        h: u64,
        key: &[u8],
        value: &[u8],
        expire_at: Option<u64>,
        now: u64,
        keep_old: bool,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if expire_at.is_some_and(|t| t <= now) {
            let old = self.remove_at(h, key).map(|e| e.value);
            return Ok(old.filter(|_| keep_old));
        }
        let volatile = expire_at.is_some();
        let new_cost = cost(key, value, volatile);
        let old_cost = self
            .find(h, key)
            .map(|e| cost(key, &e.value, e.expire_at.is_some()))
            .unwrap_or(0);
        let max = self.cfg.maxmemory;
        if max > 0 && new_cost > max {
            return Err(StoreError::Oom);
        }
        let extra = new_cost.saturating_sub(old_cost);
        if max > 0 && self.used.saturating_add(extra) > max {
            // Never evicts `key` itself, and removals leave other slots where they are.
            self.make_room(extra, key, now)?;
        }
        if self.hashes.len() >= u32::MAX as usize && old_cost == 0 {
            return Err(StoreError::Oom);
        }
        let old = match self.table.find_mut(h, |s| s.key.as_slice() == key) {
            Some(s) => {
                let was_volatile = s.e.expire_at.is_some();
                let old = if keep_old {
                    Some(std::mem::replace(&mut s.e.value, value.to_vec()))
                } else {
                    // Overwrite in place when the old buffer is not much larger: a
                    // rewritten key then costs no allocation.
                    if s.e.value.capacity() <= value.len().saturating_mul(2).saturating_add(64) {
                        s.e.value.clear();
                        s.e.value.extend_from_slice(value);
                    } else {
                        s.e.value = value.to_vec();
                    }
                    None
                };
                s.e.expire_at = expire_at;
                match (was_volatile, volatile) {
                    (false, true) => {
                        self.volatile.insert(Key::from_slice(key));
                    }
                    (true, false) => {
                        self.volatile.swap_remove(key);
                    }
                    _ => {}
                }
                old
            }
            None => {
                let pos = self.hashes.len() as u32;
                self.hashes.push(h);
                let slot = Slot {
                    key: Key::from_slice(key),
                    e: Entry {
                        value: value.to_vec(),
                        expire_at,
                        last_access: now,
                        lfu_touched: now,
                        pos,
                        lfu: LFU_INIT,
                    },
                };
                let hasher = &self.hasher;
                self.table
                    .insert_unique(h, slot, |s| hasher.hash_one(s.key.as_slice()));
                if volatile {
                    self.volatile.insert(Key::from_slice(key));
                }
                None
            }
        };
        self.used = self.used.saturating_sub(old_cost).saturating_add(new_cost);
        self.touch_key(h, key, now);
        Ok(old)
    }

    /// Delete `key`; true if it existed.
    pub fn del(&mut self, key: &[u8], now: u64) -> bool {
        let h = self.hash(key);
        self.live(h, key, now) && self.remove_at(h, key).is_some()
    }

    /// Read and delete `key` (counts a hit or miss).
    pub fn getdel(&mut self, key: &[u8], now: u64) -> Option<Vec<u8>> {
        let v = self.get(key, now);
        self.remove_entry(key);
        v
    }

    /// Set (or, with `None`, remove) the absolute expiry of an existing key; false when the
    /// key does not exist. An expiry in the past deletes the key.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>, now: u64) -> bool {
        let Some((value, cur)) = self.peek(key, now).map(|(v, t)| (v.to_vec(), t)) else {
            return false;
        };
        if cur == at {
            return true;
        }
        if at.is_some_and(|t| t <= now) {
            self.remove_entry(key);
            self.stats.expired += 1;
            return true;
        }
        // Re-insert with the new expiry; it costs at most the volatile index entry.
        self.put(key, &value, at, now).is_ok()
    }

    /// Time to live of `key`.
    pub fn ttl(&mut self, key: &[u8], now: u64) -> Ttl {
        let h = self.hash(key);
        if !self.live(h, key, now) {
            return Ttl::Missing;
        }
        match self.find(h, key) {
            None => Ttl::Missing,
            Some(e) => match e.expire_at {
                None => Ttl::Persistent,
                Some(t) => Ttl::Ms(t.saturating_sub(now)),
            },
        }
    }

    /// Add `delta` to the integer stored at `key` (0 when missing); keeps the TTL. On an
    /// error (not an integer, overflow, no memory) the key is left as it was.
    pub fn incr_by(&mut self, key: &[u8], delta: i64, now: u64) -> Result<i64, StoreError> {
        let (cur, ttl) = match self.peek(key, now) {
            None => (0i64, None),
            // Redis' reading: "041", "-0", "+1" are strings, not numbers.
            Some((v, t)) => (parse_i64(v).ok_or(StoreError::NotInteger)?, t),
        };
        let next = cur.checked_add(delta).ok_or(StoreError::Overflow)?;
        self.put(key, next.to_string().as_bytes(), ttl, now)?;
        Ok(next)
    }

    /// Append `more` to the value at `key` (created when missing); the new length.
    pub fn append(&mut self, key: &[u8], more: &[u8], now: u64) -> Result<usize, StoreError> {
        let (mut v, ttl) = self
            .peek(key, now)
            .map(|(v, t)| (v.to_vec(), t))
            .unwrap_or_default();
        if v.len().saturating_add(more.len()) > self.cfg.max_value {
            return Err(StoreError::TooLarge);
        }
        v.extend_from_slice(more);
        let n = v.len();
        self.put(key, &v, ttl, now)?;
        Ok(n)
    }

    /// Length of the value at `key` (0 when missing).
    pub fn strlen(&mut self, key: &[u8], now: u64) -> usize {
        let h = self.hash(key);
        if !self.live(h, key, now) {
            return 0;
        }
        self.find(h, key).map(|e| e.value.len()).unwrap_or(0)
    }

    /// One active expiry step: sample up to `budget` keys with a TTL and remove the expired
    /// ones. Returns how many were removed. Call it periodically (Redis: 10 times a second,
    /// repeating while more than a quarter of the sample was expired).
    pub fn active_expire(&mut self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget {
            let n = self.volatile.len();
            if n == 0 {
                break;
            }
            let i = (self.rand() % n as u64) as usize;
            let Some(k) = self.volatile.get_index(i).cloned() else {
                break;
            };
            if self.expire_if_due(&k, now) {
                removed += 1;
            }
        }
        removed
    }

    /// Every held key (a snapshot).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.table.iter().map(|s| s.key.to_vec()).collect()
    }

    /// How many held keys satisfy `pred` (expired ones not yet removed included).
    pub fn count_keys(&self, mut pred: impl FnMut(&[u8]) -> bool) -> usize {
        self.table.iter().filter(|s| pred(&s.key)).count()
    }

    /// Delete every key starting with `prefix`; how many were deleted.
    pub fn remove_prefix(&mut self, prefix: &[u8]) -> usize {
        let keys: Vec<Vec<u8>> = self
            .table
            .iter()
            .filter(|s| s.key.starts_with(prefix))
            .map(|s| s.key.to_vec())
            .collect();
        for k in &keys {
            self.remove_entry(k);
        }
        keys.len()
    }
}

#[cfg(test)]
impl Store {
    fn entry(&self, key: &[u8]) -> Option<&Entry> {
        self.find(self.hash(key), key)
    }

    /// Every key has one position, and every position leads back to its key.
    fn check_positions(&self) {
        assert_eq!(self.table.len(), self.hashes.len());
        for pos in 0..self.hashes.len() {
            let s = self.at(pos).expect("every position leads to an entry");
            assert_eq!(self.hash(&s.key), self.hashes[pos]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(maxmemory: usize, policy: Policy) -> Store {
        Store::new(StoreConfig {
            maxmemory,
            policy,
            samples: 64,
            ..StoreConfig::default()
        })
    }

    fn set(s: &mut Store, k: &str, v: &str, now: u64) -> Result<SetOutcome, StoreError> {
        s.set(k.as_bytes(), v.as_bytes(), SetOptions::default(), now)
    }

    #[test]
    fn set_options_table() {
        // (existing?, nx, xx, written)
        let table = [
            (false, false, false, true),
            (true, false, false, true),
            (false, true, false, true),
            (true, true, false, false),
            (false, false, true, false),
            (true, false, true, true),
        ];
        for (existing, nx, xx, written) in table {
            let mut s = store(0, Policy::AllkeysLru);
            if existing {
                set(&mut s, "k", "old", 0).expect("set");
            }
            let o = s
                .set(
                    b"k",
                    b"new",
                    SetOptions {
                        nx,
                        xx,
                        get: true,
                        ..Default::default()
                    },
                    1,
                )
                .expect("set");
            assert_eq!(o.written, written, "{existing} {nx} {xx}");
            assert_eq!(o.old.is_some(), existing);
            let want: Option<&[u8]> = match (written, existing) {
                (true, _) => Some(b"new"),
                (false, true) => Some(b"old"),
                (false, false) => None,
            };
            assert_eq!(s.get(b"k", 2).as_deref(), want);
        }
    }

    #[test]
    fn ttl_lazy_and_active() {
        let mut s = store(0, Policy::AllkeysLru);
        let at = |t| SetOptions {
            expire_at: Some(t),
            ..Default::default()
        };
        s.set(b"a", b"1", at(100), 0).expect("set");
        s.set(b"b", b"1", at(200), 0).expect("set");
        set(&mut s, "c", "1", 0).expect("set");
        assert_eq!(s.ttl(b"a", 40), Ttl::Ms(60));
        assert_eq!(s.ttl(b"c", 40), Ttl::Persistent);
        assert_eq!(s.ttl(b"zz", 40), Ttl::Missing);
        assert_eq!(s.get(b"a", 100), None, "lazy expiry at the deadline");
        assert_eq!(s.stats().expired, 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.active_expire(150, 100), 0);
        assert_eq!(s.active_expire(250, 100), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.volatile_len(), 0);
        // PERSIST and EXPIRE in the past.
        s.set(b"d", b"1", at(1000), 300).expect("set");
        assert!(s.set_expiry(b"d", None, 300));
        assert_eq!(s.ttl(b"d", 2000), Ttl::Persistent);
        assert!(s.set_expiry(b"d", Some(10), 300));
        assert_eq!(s.ttl(b"d", 300), Ttl::Missing);
        assert!(!s.set_expiry(b"nope", Some(10_000), 300));
    }

    #[test]
    fn incr_and_append() {
        let mut s = store(0, Policy::AllkeysLru);
        assert_eq!(s.incr_by(b"n", 5, 0), Ok(5));
        assert_eq!(s.incr_by(b"n", -7, 0), Ok(-2));
        set(&mut s, "x", "abc", 0).expect("set");
        assert_eq!(s.incr_by(b"x", 1, 0), Err(StoreError::NotInteger));
        set(&mut s, "m", &i64::MAX.to_string(), 0).expect("set");
        assert_eq!(s.incr_by(b"m", 1, 0), Err(StoreError::Overflow));
        for bad in [" 1", "1 ", "+1", "", "1.5", "99999999999999999999"] {
            set(&mut s, "b", bad, 0).expect("set");
            assert_eq!(
                s.incr_by(b"b", 1, 0),
                Err(StoreError::NotInteger),
                "{bad:?}"
            );
        }
        assert_eq!(s.append(b"x", b"de", 0), Ok(5));
        assert_eq!(s.append(b"new", b"z", 0), Ok(1));
        assert_eq!(s.strlen(b"x", 0), 5);
        assert_eq!(s.getdel(b"x", 0).as_deref(), Some(&b"abcde"[..]));
        assert_eq!(s.strlen(b"x", 0), 0);
    }

    #[test]
    fn memory_accounting_returns_to_zero() {
        let mut s = store(0, Policy::AllkeysLru);
        for i in 0..100 {
            let o = SetOptions {
                expire_at: (i % 2 == 0).then_some(1000),
                ..Default::default()
            };
            s.set(format!("k{i}").as_bytes(), &vec![0; i], o, 0)
                .expect("set");
        }
        assert!(s.used_memory() > 100 * ENTRY_OVERHEAD);
        for i in 0..50 {
            s.set_expiry(format!("k{i}").as_bytes(), None, 1);
            s.append(format!("k{i}").as_bytes(), b"xx", 1)
                .expect("append");
        }
        for i in 0..100 {
            s.del(format!("k{i}").as_bytes(), 2);
        }
        assert_eq!((s.used_memory(), s.len(), s.volatile_len()), (0, 0, 0));
    }

    /// Each row: policy, and which of the keys a(old, hot), b(new, cold), c(ttl soon) goes
    /// first when a fourth key does not fit.
    #[test]
    fn eviction_policies_table() {
        let per = cost(b"a", &[0; 100], false);
        let table: [(Policy, Option<&str>); 4] = [
            (Policy::AllkeysLru, Some("b")),
            (Policy::AllkeysLfu, Some("b")),
            (Policy::VolatileTtl, Some("c")),
            (Policy::Noeviction, None),
        ];
        for (policy, victim) in table {
            let mut s = store(per * 3 + 40, policy);
            set(&mut s, "a", &"x".repeat(100), 0).expect("a");
            set(&mut s, "b", &"x".repeat(100), 10).expect("b");
            s.set(
                b"c",
                &[b'x'; 84],
                SetOptions {
                    expire_at: Some(10_000),
                    ..Default::default()
                },
                20,
            )
            .expect("c");
            // a is read often and last; b never again; c once.
            for t in 0..200 {
                s.get(b"a", 30 + t);
            }
            s.get(b"c", 25);
            let r = set(&mut s, "d", &"x".repeat(100), 300);
            match victim {
                None => assert_eq!(r, Err(StoreError::Oom), "{policy:?}"),
                Some(v) => {
                    r.expect("fits after eviction");
                    assert!(!s.exists(v.as_bytes(), 300), "{policy:?} kept {v}");
                    assert_eq!(s.stats().evictions, 1, "{policy:?}");
                    assert_eq!(s.len(), 3);
                }
            }
            assert!(s.used_memory() <= per * 3 + 40);
        }
    }

    #[test]
    fn volatile_ttl_without_volatile_keys_is_oom() {
        let mut s = store(500, Policy::VolatileTtl);
        set(&mut s, "a", &"x".repeat(200), 0).expect("a");
        assert_eq!(set(&mut s, "b", &"x".repeat(200), 0), Err(StoreError::Oom));
        assert_eq!(
            set(&mut s, "big", &"x".repeat(1000), 0),
            Err(StoreError::Oom)
        );
    }

    #[test]
    fn lfu_counter_grows_and_decays() {
        let mut s = store(0, Policy::AllkeysLfu);
        set(&mut s, "k", "v", 0).expect("set");
        for _ in 0..10_000 {
            s.get(b"k", 0);
        }
        let hot = s.entry(b"k").map(|e| e.lfu).unwrap_or(0);
        assert!(hot > 15 && hot < 255, "{hot}");
        let e = s.entry(b"k").cloned().expect("entry");
        assert_eq!(s.lfu_decayed(&e, 60_000 * 10), hot - 10);
    }

    #[test]
    fn remove_prefix_and_lru_under_pressure() {
        let mut s = Store::new(StoreConfig {
            maxmemory: 100 * (ENTRY_OVERHEAD + 10),
            ..StoreConfig::default()
        });
        for i in 0..1000u64 {
            s.set(
                format!("k{i:04}").as_bytes(),
                b"vvvvv",
                SetOptions::default(),
                i,
            )
            .expect("set");
        }
        assert!(s.used_memory() <= 100 * (ENTRY_OVERHEAD + 10));
        assert!(s.stats().evictions >= 900);
        s.check_positions();
        // Recent keys survive far more often than old ones (sampled LRU).
        let recent = (900..1000)
            .filter(|i| s.exists(format!("k{i:04}").as_bytes(), 2000))
            .count();
        let old = (0..100)
            .filter(|i| s.exists(format!("k{i:04}").as_bytes(), 2000))
            .count();
        assert!(recent > old, "{recent} vs {old}");
        let n = s.len();
        let want = (900..1000)
            .filter(|i| s.entry(format!("k{i:04}").as_bytes()).is_some())
            .count();
        assert_eq!(s.remove_prefix(b"k09"), want);
        assert_eq!(s.len(), n - want);
        s.check_positions();
    }

    /// Random writes, reads, deletes and expiries on a few keys agree with a plain map model
    /// (no eviction), and the memory account always equals the sum of the entries' costs.
    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Op {
            Set(u8, u8, Option<u8>, bool, bool, bool),
            Put(u8, u8, Option<u8>),
            Get(u8),
            Del(u8),
            Expire(u8, Option<u8>),
            Tick(u8),
        }

        fn op() -> impl Strategy<Value = Op> {
            let k = 0u8..6;
            prop_oneof![
                (
                    k.clone(),
                    any::<u8>(),
                    proptest::option::of(0u8..20),
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>()
                )
                    .prop_map(|(k, v, t, nx, xx, keep)| Op::Set(k, v, t, nx, xx, keep)),
                (k.clone(), any::<u8>(), proptest::option::of(0u8..20))
                    .prop_map(|(k, v, t)| Op::Put(k, v, t)),
                k.clone().prop_map(Op::Get),
                k.clone().prop_map(Op::Del),
                (k, proptest::option::of(0u8..20)).prop_map(|(k, t)| Op::Expire(k, t)),
                (0u8..10).prop_map(Op::Tick),
            ]
        }

        fn key(k: u8) -> Vec<u8> {
            format!("key-{k}").into_bytes()
        }

        fn val(v: u8) -> Vec<u8> {
            vec![b'v'; v as usize % 7]
        }

        proptest! {
            #[test]
            fn store_matches_a_map(ops in proptest::collection::vec(op(), 1..200)) {
                let mut s = store(0, Policy::AllkeysLru);
                // key -> (value, absolute expiry)
                let mut m: BTreeMap<Vec<u8>, (Vec<u8>, Option<u64>)> = BTreeMap::new();
                let mut now = 1000u64;
                for op in ops {
                    m.retain(|_, (_, t)| t.is_none_or(|t| t > now));
                    match op {
                        Op::Set(k, v, t, nx, xx, keep) => {
                            let (k, v) = (key(k), val(v));
                            let opts = SetOptions {
                                expire_at: t.map(|t| now + t as u64),
                                keep_ttl: keep && t.is_none(),
                                nx,
                                xx: xx && !nx,
                                // Both ways: returning the old value, and overwriting it
                                // in place.
                                get: xx,
                            };
                            let cur = m.get(&k).cloned();
                            let o = s.set(&k, &v, opts, now).expect("set");
                            let want = cur.as_ref().map(|c| c.0.clone()).filter(|_| opts.get);
                            prop_assert_eq!(o.old, want);
                            let write = !(opts.nx && cur.is_some() || opts.xx && cur.is_none());
                            prop_assert_eq!(o.written, write);
                            if write {
                                let at = if opts.keep_ttl { cur.and_then(|c| c.1) } else { opts.expire_at };
                                m.insert(k, (v, at));
                            }
                        }
                        Op::Put(k, v, t) => {
                            let (k, v) = (key(k), val(v));
                            let at = t.map(|t| now + t as u64);
                            s.put(&k, &v, at, now).expect("put");
                            if at.is_some_and(|t| t <= now) {
                                m.remove(&k);
                            } else {
                                m.insert(k, (v, at));
                            }
                        }
                        Op::Get(k) => {
                            let k = key(k);
                            prop_assert_eq!(s.get(&k, now), m.get(&k).map(|e| e.0.clone()));
                        }
                        Op::Del(k) => {
                            let k = key(k);
                            prop_assert_eq!(s.del(&k, now), m.remove(&k).is_some());
                        }
                        Op::Expire(k, t) => {
                            let k = key(k);
                            let at = t.map(|t| now + t as u64);
                            prop_assert_eq!(s.set_expiry(&k, at, now), m.contains_key(&k));
                            if at.is_some_and(|t| t <= now) {
                                m.remove(&k);
                            } else if let Some(e) = m.get_mut(&k) {
                                e.1 = at;
                            }
                        }
                        Op::Tick(d) => now += d as u64,
                    }
                    m.retain(|_, (_, t)| t.is_none_or(|t| t > now));
                    // Peeking every key also drops the expired ones, so the counts below
                    // cover live keys only.
                    for k in (0..6).map(key) {
                        prop_assert_eq!(s.peek(&k, now), m.get(&k).map(|(v, t)| (v.as_slice(), *t)));
                    }
                    s.check_positions();
                    let want: usize = m.iter().map(|(k, (v, t))| cost(k, v, t.is_some())).sum();
                    prop_assert_eq!(s.len(), m.len());
                    prop_assert_eq!(s.used_memory(), want);
                    prop_assert_eq!(s.volatile_len(), m.values().filter(|e| e.1.is_some()).count());
                }
            }
        }
    }
}
