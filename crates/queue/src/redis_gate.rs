//! The Redis dependency gate (feature `redis`): per-run unfinished-parent counts, a done bitmap
//! and the outstanding count, completed by one atomic Lua script per task (`lua/complete.lua`)
//! and settled without success by another (`lua/skip.lua`).
//!
//! Key layout, every key under the configured prefix with the run id as a hash tag (so a run's
//! keys share one cluster slot and one script may touch them together):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<prefix>:run:{<run id>}:outstanding` | integer | tasks neither done nor skipped; written last by `load`, so a half-loaded run is unknown |
//! | `<prefix>:run:{<run id>}:parents` | string | one big-endian `u32` per task (`BITFIELD … u32 #<task>`): its unfinished parents; the length / 4 is the run's task count |
//! | `<prefix>:run:{<run id>}:done` | bitmap | bit `<task>` set once the task is done or skipped |
//!
//! Packed counts rather than a hash: a million tasks load as 4 MB in a few commands instead of
//! a million hash fields (about 48 MB in Redis and two seconds to write).
//!
//! Every key expires after the configured TTL, set (and refreshed) by `load` only: a run that
//! outlives it, like a run lost to a restart, becomes unknown. A run with any of its three keys
//! missing (never loaded, cleared, expired, evicted, or Redis restarted without persistence) is
//! unknown: `outstanding` says `None` and the scripts answer [`QueueError::UnknownRun`], so the
//! coordinator rebuilds the counters from state. Redis is never the truth.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use crate::{Completion, DependencyGate, QueueError, RunId};

/// `load` writes the parent counts in pieces of this many tasks (1 MiB), one command each.
const LOAD_BATCH_TASKS: usize = 1 << 18;
/// `skip` settles this many tasks per script call, so that no call blocks Redis for long.
const SKIP_BATCH_TASKS: usize = 10_000;

/// The completion script: see `lua/complete.lua`.
const COMPLETE_SCRIPT: &str = include_str!("../lua/complete.lua");
/// The skip script: see `lua/skip.lua`.
const SKIP_SCRIPT: &str = include_str!("../lua/skip.lua");

/// How a [`RedisGate`] names its keys, how long they live and how long it waits for Redis.
#[derive(Clone, Debug)]
pub struct RedisGateConfig {
    /// Every key starts with `<key_prefix>:`; tenants and tests pick their own. Must be
    /// non-empty and free of `{`, `}` and `*` (they would break the hash tag or key scans).
    pub key_prefix: String,
    /// How long a run's keys live after the run was loaded.
    pub ttl: Duration,
    /// How long one command or script may take before it fails as a transient error.
    pub response_timeout: Duration,
    /// How long one connection attempt may take.
    pub connection_timeout: Duration,
    /// Connection attempts (with exponential backoff) before a connect or reconnect gives up
    /// and the call fails as a transient error.
    pub connection_retries: usize,
}

impl RedisGateConfig {
    pub fn new(key_prefix: &str, ttl: Duration) -> RedisGateConfig {
        RedisGateConfig {
            key_prefix: key_prefix.to_owned(),
            ttl,
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(2),
            connection_retries: 6,
        }
    }
}

/// Redis strings that must never appear in an error message: the URL and its password.
#[derive(Clone, Default)]
struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    fn redact(&self, message: String) -> String {
        sluice_core::config::redact(&message, &self.values)
    }
}

/// The three keys of one run.
struct RunKeys {
    outstanding: String,
    parents: String,
    done: String,
}

/// [`DependencyGate`] on Redis through a reconnecting [`ConnectionManager`]; cheap to clone
/// (clones share the connection).
#[derive(Clone)]
pub struct RedisGate {
    connection: ConnectionManager,
    config: RedisGateConfig,
    complete_script: Script,
    skip_script: Script,
    secrets: Secrets,
}

impl std::fmt::Debug for RedisGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGate").field("key_prefix", &self.config.key_prefix).field("ttl", &self.config.ttl).finish()
    }
}

impl RedisGate {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`) with the default timeouts.
    pub async fn connect(url: &str, key_prefix: &str, ttl: Duration) -> Result<RedisGate, QueueError> {
        RedisGate::connect_with_config(url, RedisGateConfig::new(key_prefix, ttl)).await
    }

    pub async fn connect_with_config(url: &str, config: RedisGateConfig) -> Result<RedisGate, QueueError> {
        let prefix = &config.key_prefix;
        if prefix.is_empty() || prefix.contains(['{', '}', '*']) {
            return Err(QueueError::Backend(format!(
                "invalid redis key prefix {prefix:?}: it must be non-empty and free of '{{', '}}' and '*'"
            )));
        }
        let mut secrets = Secrets { values: vec![url.to_owned()] };
        let client = match redis::Client::open(url) {
            Ok(client) => client,
            Err(error) => return Err(backend_error(&secrets, "url parsing", &error)),
        };
        if let Some(password) = client.get_connection_info().redis_settings().password() {
            secrets.values.push(password.to_owned());
        }
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connection_timeout))
            .set_number_of_retries(config.connection_retries);
        let connection = match ConnectionManager::new_with_config(client, manager_config).await {
            Ok(connection) => connection,
            Err(error) => return Err(backend_error(&secrets, "connect", &error)),
        };
        Ok(RedisGate {
            connection,
            config,
            complete_script: Script::new(COMPLETE_SCRIPT),
            skip_script: Script::new(SKIP_SCRIPT),
            secrets,
        })
    }

    pub fn config(&self) -> &RedisGateConfig {
        &self.config
    }

    /// Whether Redis answers a PING (a readiness check).
    pub async fn check(&self) -> Result<(), QueueError> {
        let mut connection = self.connection.clone();
        let answer: Result<String, redis::RedisError> = redis::cmd("PING").query_async(&mut connection).await;
        answer.map(|_| ()).map_err(|error| self.error("ping", &error))
    }

    fn run_keys(&self, run_id: &RunId) -> RunKeys {
        let run = format!("{}:run:{{{}}}", self.config.key_prefix, run_id);
        RunKeys {
            outstanding: format!("{run}:outstanding"),
            parents: format!("{run}:parents"),
            done: format!("{run}:done"),
        }
    }

    fn ttl_millis(&self) -> u64 {
        u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    fn error(&self, action: &str, error: &RedisError) -> QueueError {
        backend_error(&self.secrets, action, error)
    }
}

fn backend_error(secrets: &Secrets, action: &str, error: &RedisError) -> QueueError {
    QueueError::Backend(secrets.redact(format!("redis {action} failed: {error}")))
}

/// Parent counts as `BITFIELD … u32 #<task>` reads them: four big-endian bytes per task.
fn packed_counts(counts: &[u32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(counts.len() * 4);
    for count in counts {
        bytes.extend_from_slice(&count.to_be_bytes());
    }
    bytes
}

/// The done bitmap as Redis stores it: bit `i` is the most significant bit first of byte `i / 8`.
fn done_bitmap(done: &[bool]) -> Vec<u8> {
    let mut bitmap = vec![0u8; done.len().div_ceil(8).max(1)];
    for (index, is_done) in done.iter().enumerate() {
        if *is_done {
            bitmap[index / 8] |= 0x80 >> (index % 8);
        }
    }
    bitmap
}

#[async_trait]
impl DependencyGate for RedisGate {
    async fn load(&self, run_id: &RunId, unfinished_parents: &[u32], done: &[bool]) -> Result<(), QueueError> {
        if unfinished_parents.len() != done.len() {
            return Err(QueueError::Backend(format!(
                "run {run_id}: {} parent counts for {} tasks",
                unfinished_parents.len(),
                done.len()
            )));
        }
        let keys = self.run_keys(run_id);
        let ttl = self.ttl_millis();
        let mut connection = self.connection.clone();

        // Forget the old run first: from here until the last step the run is unknown, so a
        // stale completion fails instead of seeing half a load.
        let mut forget = redis::cmd("UNLINK");
        forget.arg(&keys.outstanding).arg(&keys.parents).arg(&keys.done);
        if let Err(error) = forget.query_async::<()>(&mut connection).await {
            return Err(self.error("load", &error));
        }

        // The parent counts, a piece at a time: SET (with the expiry, so a coordinator dying
        // mid-load leaves nothing forever) then APPEND, which keeps the expiry.
        let mut batches = unfinished_parents.chunks(LOAD_BATCH_TASKS);
        let first_batch = batches.next().unwrap_or(&[]);
        let mut set = redis::cmd("SET");
        set.arg(&keys.parents).arg(packed_counts(first_batch)).arg("PX").arg(ttl);
        if let Err(error) = set.query_async::<()>(&mut connection).await {
            return Err(self.error("load", &error));
        }
        for batch in batches {
            let mut append = redis::cmd("APPEND");
            append.arg(&keys.parents).arg(packed_counts(batch));
            if let Err(error) = append.query_async::<()>(&mut connection).await {
                return Err(self.error("load", &error));
            }
        }

        // The done bitmap, then the outstanding count and every expiry together.
        let outstanding = done.iter().filter(|is_done| !**is_done).count();
        let mut finish = redis::pipe();
        finish.atomic();
        finish.cmd("SET").arg(&keys.done).arg(done_bitmap(done)).arg("PX").arg(ttl).ignore();
        finish.cmd("PEXPIRE").arg(&keys.parents).arg(ttl).ignore();
        finish.cmd("SET").arg(&keys.outstanding).arg(outstanding).arg("PX").arg(ttl).ignore();
        if let Err(error) = finish.query_async::<()>(&mut connection).await {
            return Err(self.error("load", &error));
        }
        Ok(())
    }

    async fn complete(&self, run_id: &RunId, task: u32, children: &[u32]) -> Result<Completion, QueueError> {
        let keys = self.run_keys(run_id);
        let mut invocation = self.complete_script.prepare_invoke();
        invocation.key(&keys.outstanding).key(&keys.parents).key(&keys.done).arg(task);
        for child in children {
            invocation.arg(*child);
        }
        let mut connection = self.connection.clone();
        let reply: Vec<i64> = match invocation.invoke_async(&mut connection).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.error("complete", &error)),
        };
        match reply.as_slice() {
            [1, newly_done, run_complete, ready @ ..] => {
                let mut ready_children = Vec::with_capacity(ready.len());
                for child in ready {
                    match u32::try_from(*child) {
                        Ok(child) => ready_children.push(child),
                        Err(_) => return Err(unexpected_reply("complete", &reply)),
                    }
                }
                Ok(Completion { newly_done: *newly_done == 1, ready: ready_children, run_complete: *run_complete == 1 })
            }
            [0] => Err(QueueError::UnknownRun(run_id.to_string())),
            [-1] => Err(QueueError::Backend(format!("task {task} is not in run {run_id}"))),
            _ => Err(unexpected_reply("complete", &reply)),
        }
    }

    async fn skip(&self, run_id: &RunId, tasks: &[u32]) -> Result<bool, QueueError> {
        let keys = self.run_keys(run_id);
        let mut connection = self.connection.clone();
        // Each call is idempotent on its own, so settling in batches is safe to retry; the last
        // batch's answer is the run's state after all of them. No task still runs one call.
        let mut batches: Vec<&[u32]> = tasks.chunks(SKIP_BATCH_TASKS).collect();
        if batches.is_empty() {
            batches.push(&[]);
        }
        let mut run_complete = false;
        for batch in batches {
            let mut invocation = self.skip_script.prepare_invoke();
            invocation.key(&keys.outstanding).key(&keys.parents).key(&keys.done);
            for task in batch {
                invocation.arg(*task);
            }
            let reply: i64 = match invocation.invoke_async(&mut connection).await {
                Ok(reply) => reply,
                Err(error) => return Err(self.error("skip", &error)),
            };
            run_complete = match reply {
                1 => true,
                0 => false,
                -1 => return Err(QueueError::UnknownRun(run_id.to_string())),
                _ => return Err(unexpected_reply("skip", &[reply])),
            };
        }
        Ok(run_complete)
    }

    async fn outstanding(&self, run_id: &RunId) -> Result<Option<u64>, QueueError> {
        let keys = self.run_keys(run_id);
        let mut connection = self.connection.clone();
        let mut pipeline = redis::pipe();
        pipeline.atomic();
        pipeline.cmd("EXISTS").arg(&keys.outstanding).arg(&keys.parents).arg(&keys.done);
        pipeline.cmd("GET").arg(&keys.outstanding);
        let (existing, outstanding): (u64, Option<u64>) = match pipeline.query_async(&mut connection).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.error("outstanding", &error)),
        };
        if existing < 3 {
            return Ok(None);
        }
        Ok(outstanding)
    }

    async fn clear(&self, run_id: &RunId) -> Result<(), QueueError> {
        let keys = self.run_keys(run_id);
        let mut connection = self.connection.clone();
        let mut unlink = redis::cmd("UNLINK");
        unlink.arg(&keys.outstanding).arg(&keys.parents).arg(&keys.done);
        match unlink.query_async::<()>(&mut connection).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.error("clear", &error)),
        }
    }
}

fn unexpected_reply(action: &str, reply: &[i64]) -> QueueError {
    QueueError::Backend(format!("redis {action} script gave an unexpected reply {reply:?}"))
}

/// A gate on the local Redis under a fresh key prefix, for this crate's tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::{RedisGate, RedisGateConfig};

    /// The test server; `SLUICE_TEST_REDIS_URL` points the tests elsewhere.
    pub(crate) fn redis_url() -> String {
        std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// A prefix no other test (of this process or another) uses.
    pub(crate) fn unique_prefix() -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let random = RandomState::new().hash_one(std::time::SystemTime::now());
        format!("sluice-test:{}-{}-{random:016x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
    }

    /// Connects under a fresh prefix; leftovers of a failed test expire within the hour.
    pub(crate) async fn gate() -> RedisGate {
        let config = RedisGateConfig::new(&unique_prefix(), Duration::from_secs(3600));
        match RedisGate::connect_with_config(&redis_url(), config).await {
            Ok(gate) => gate,
            Err(error) => panic!("the tests need Redis at {} (scripts/services.sh starts it): {error}", redis_url()),
        }
    }

    /// Keys under the gate's prefix.
    pub(crate) async fn keys(gate: &RedisGate) -> Vec<String> {
        let mut connection = gate.connection.clone();
        let pattern = format!("{}:*", gate.config.key_prefix);
        let mut found = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .unwrap();
            found.extend(batch);
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    }

    /// Deletes the given keys (a test's stand-in for a FLUSHALL, limited to its own prefix).
    pub(crate) async fn delete(gate: &RedisGate, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let mut connection = gate.connection.clone();
        redis::cmd("DEL").arg(keys).query_async::<()>(&mut connection).await.unwrap();
    }

    /// Deletes every key under the gate's prefix.
    pub(crate) async fn delete_all(gate: &RedisGate) {
        let keys = keys(gate).await;
        delete(gate, &keys).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::test_support::{delete, delete_all, gate, keys, redis_url, unique_prefix};
    use super::*;

    fn run(name: &str) -> RunId {
        RunId(name.to_owned())
    }

    #[test]
    fn counts_are_big_endian_words() {
        assert_eq!(packed_counts(&[]), Vec::<u8>::new());
        assert_eq!(packed_counts(&[1, 0x0102_0304]), vec![0, 0, 0, 1, 1, 2, 3, 4]);
    }

    #[test]
    fn the_bitmap_puts_task_zero_in_the_most_significant_bit() {
        assert_eq!(done_bitmap(&[]), vec![0]);
        assert_eq!(done_bitmap(&[true]), vec![0x80]);
        assert_eq!(done_bitmap(&[false, true, false, false, false, false, false, true, true]), vec![0x41, 0x80]);
    }

    #[tokio::test]
    async fn every_key_lives_under_the_prefix_and_expires() {
        let gate = gate().await;
        gate.load(&run("r-ttl"), &[0, 1, 2], &[false, false, true]).await.unwrap();
        let found = keys(&gate).await;
        assert_eq!(found.len(), 3, "{found:?}");
        let mut connection = gate.connection.clone();
        for key in &found {
            assert!(key.starts_with(&format!("{}:run:{{r-ttl}}:", gate.config.key_prefix)), "{key}");
            let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut connection).await.unwrap();
            assert!(ttl > 0 && ttl <= 3_600_000, "{key} expires in {ttl} ms");
        }
        gate.clear(&run("r-ttl")).await.unwrap();
        assert!(keys(&gate).await.is_empty());
    }

    #[tokio::test]
    async fn a_run_whose_keys_are_lost_is_unknown() {
        let gate = gate().await;
        let lost = run("r-lost");
        gate.load(&lost, &[0, 1, 1], &[false; 3]).await.unwrap();
        assert_eq!(gate.complete(&lost, 0, &[1]).await.unwrap().ready, vec![1]);
        assert_eq!(gate.outstanding(&lost).await.unwrap(), Some(2));

        // What a FLUSHALL or a restart without persistence does, limited to this test's prefix.
        delete_all(&gate).await;
        assert_eq!(gate.outstanding(&lost).await.unwrap(), None);
        assert!(matches!(gate.complete(&lost, 1, &[2]).await, Err(QueueError::UnknownRun(id)) if id == "r-lost"));
        assert!(matches!(gate.skip(&lost, &[2]).await, Err(QueueError::UnknownRun(_))));
        assert!(keys(&gate).await.is_empty(), "a refused call must not recreate keys");

        // Losing any one key (an eviction) makes the run unknown too, never half-known.
        for lost_suffix in [":parents", ":done", ":outstanding"] {
            gate.load(&lost, &[0, 1, 1], &[false; 3]).await.unwrap();
            let key: Vec<String> = keys(&gate).await.into_iter().filter(|key| key.ends_with(lost_suffix)).collect();
            delete(&gate, &key).await;
            assert_eq!(gate.outstanding(&lost).await.unwrap(), None, "{lost_suffix}");
            assert!(matches!(gate.complete(&lost, 0, &[1]).await, Err(QueueError::UnknownRun(_))), "{lost_suffix}");
        }

        // A reload makes it known again, from scratch.
        gate.load(&lost, &[0, 1, 1], &[true, false, false]).await.unwrap();
        assert_eq!(gate.outstanding(&lost).await.unwrap(), Some(2));
        gate.clear(&lost).await.unwrap();
    }

    #[tokio::test]
    async fn load_replaces_the_run_and_runs_do_not_collide() {
        let gate = gate().await;
        let first = run("r-first");
        let second = run("r-second");
        gate.load(&first, &[0, 1], &[false, false]).await.unwrap();
        gate.load(&second, &[0, 1], &[false, false]).await.unwrap();
        assert!(gate.complete(&first, 0, &[1]).await.unwrap().newly_done);
        // Reloading `first` forgets its completion; `second` never saw it.
        gate.load(&first, &[0, 1], &[false, false]).await.unwrap();
        assert!(gate.complete(&first, 0, &[1]).await.unwrap().newly_done);
        assert_eq!(gate.outstanding(&second).await.unwrap(), Some(2));
        assert_eq!(gate.complete(&second, 0, &[1]).await.unwrap().ready, vec![1]);
        delete_all(&gate).await;
    }

    #[tokio::test]
    async fn an_empty_run_is_known_and_complete() {
        let gate = gate().await;
        let empty = run("r-empty");
        gate.load(&empty, &[], &[]).await.unwrap();
        assert_eq!(gate.outstanding(&empty).await.unwrap(), Some(0));
        assert!(gate.skip(&empty, &[]).await.unwrap());
        delete_all(&gate).await;
    }

    #[tokio::test]
    async fn tasks_outside_the_run_behave_as_in_memory() {
        let gate = gate().await;
        let small = run("r-small");
        gate.load(&small, &[0, 1], &[false, false]).await.unwrap();
        assert!(
            matches!(gate.complete(&small, 2, &[]).await, Err(QueueError::Backend(message)) if message.contains("task 2"))
        );
        // Children and skipped tasks outside the run are ignored.
        let completion = gate.complete(&small, 0, &[1, 9]).await.unwrap();
        assert_eq!(completion.ready, vec![1]);
        assert!(!gate.skip(&small, &[7]).await.unwrap());
        assert_eq!(gate.outstanding(&small).await.unwrap(), Some(1));
        assert!(matches!(gate.load(&small, &[0], &[false, false]).await, Err(QueueError::Backend(_))));
        delete_all(&gate).await;
    }

    #[tokio::test]
    async fn a_hundred_thousand_task_chain_loads_and_completes() {
        const TASKS: usize = 100_000;
        let gate = gate().await;
        let chain = run("r-chain");
        // 0 → 1 → 2 → … → 99,999
        let mut parents = vec![1u32; TASKS];
        parents[0] = 0;
        gate.load(&chain, &parents, &vec![false; TASKS]).await.unwrap();
        assert_eq!(gate.outstanding(&chain).await.unwrap(), Some(TASKS as u64));
        for task in 0..1_000u32 {
            let completion = gate.complete(&chain, task, &[task + 1]).await.unwrap();
            assert!(completion.newly_done, "task {task}");
            assert_eq!(completion.ready, vec![task + 1]);
        }
        // Tasks in later batches are still held by their parents (a duplicate completion of a
        // done task decrements nothing, so it only reads their counts).
        let duplicate = gate.complete(&chain, 0, &[50_001, 99_999]).await.unwrap();
        assert!(!duplicate.newly_done);
        assert_eq!(duplicate.ready, Vec::<u32>::new());
        assert_eq!(gate.complete(&chain, 1_000, &[1_001]).await.unwrap().ready, vec![1_001]);
        assert_eq!(gate.outstanding(&chain).await.unwrap(), Some(TASKS as u64 - 1_001));
        // The rest fails: one skip of ~99,000 tasks spans several script calls.
        let rest: Vec<u32> = (1_001..TASKS as u32).collect();
        assert!(gate.skip(&chain, &rest).await.unwrap());
        assert_eq!(gate.outstanding(&chain).await.unwrap(), Some(0));

        // A resume: everything but the last two recorded in state.
        let mut done = vec![true; TASKS];
        done[TASKS - 2] = false;
        done[TASKS - 1] = false;
        let mut unfinished = vec![0u32; TASKS];
        unfinished[TASKS - 1] = 1;
        gate.load(&chain, &unfinished, &done).await.unwrap();
        assert_eq!(gate.outstanding(&chain).await.unwrap(), Some(2));
        let last = TASKS as u32 - 1;
        let before_last = gate.complete(&chain, last - 1, &[last]).await.unwrap();
        assert_eq!((before_last.ready, before_last.run_complete), (vec![last], false));
        assert!(gate.complete(&chain, last, &[]).await.unwrap().run_complete);
        assert!(!gate.complete(&chain, 3, &[4]).await.unwrap().newly_done);
        delete_all(&gate).await;
    }

    #[tokio::test]
    async fn a_load_in_several_pieces_keeps_every_count() {
        let gate = gate().await;
        let pieces = run("r-pieces");
        let tasks = LOAD_BATCH_TASKS * 2 + 5;
        let unfinished: Vec<u32> = (0..tasks).map(|task| (task % 5) as u32).collect();
        let done: Vec<bool> = (0..tasks).map(|task| task % 3 == 0).collect();
        gate.load(&pieces, &unfinished, &done).await.unwrap();
        let not_done = done.iter().filter(|is_done| !**is_done).count() as u64;
        assert_eq!(gate.outstanding(&pieces).await.unwrap(), Some(not_done));
        // Task 0 is done: completing it again only reads the children's counts and done bits.
        let mut around_the_seams = Vec::new();
        for seam in [0, LOAD_BATCH_TASKS, 2 * LOAD_BATCH_TASKS] {
            around_the_seams.extend((seam.saturating_sub(6)..(seam + 5).min(tasks)).map(|task| task as u32));
        }
        let expected: Vec<u32> = around_the_seams
            .iter()
            .copied()
            .filter(|task| unfinished[*task as usize] == 0 && !done[*task as usize])
            .collect();
        let completion = gate.complete(&pieces, 0, &around_the_seams).await.unwrap();
        assert!(!completion.newly_done);
        assert_eq!(completion.ready, expected);
        assert!(!expected.is_empty());
        delete_all(&gate).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_completions_release_each_task_once() {
        const PARENTS: u32 = 16;
        const CALLERS_PER_PARENT: u32 = 8;
        const CONNECTIONS: usize = 4;
        let first = gate().await;
        let prefix = first.config.key_prefix.clone();
        let mut gates = vec![first];
        for _ in 1..CONNECTIONS {
            let config = RedisGateConfig::new(&prefix, Duration::from_secs(3600));
            gates.push(RedisGate::connect_with_config(&redis_url(), config).await.unwrap());
        }
        // A wide diamond: 0 → 1..=16 → 17.
        let wide = run("r-wide");
        let sink = PARENTS + 1;
        let mut parents = vec![1u32; sink as usize + 1];
        parents[0] = 0;
        parents[sink as usize] = PARENTS;
        gates[0].load(&wide, &parents, &vec![false; sink as usize + 1]).await.unwrap();
        let middle: Vec<u32> = (1..=PARENTS).collect();
        assert_eq!(gates[0].complete(&wide, 0, &middle).await.unwrap().ready.len(), PARENTS as usize);

        let start = Arc::new(tokio::sync::Barrier::new((PARENTS * CALLERS_PER_PARENT) as usize));
        let mut callers = Vec::new();
        for caller in 0..PARENTS * CALLERS_PER_PARENT {
            let gate = gates[caller as usize % CONNECTIONS].clone();
            let start = Arc::clone(&start);
            let wide = wide.clone();
            let parent = 1 + caller % PARENTS;
            callers.push(tokio::spawn(async move {
                start.wait().await;
                (parent, gate.complete(&wide, parent, &[sink]).await.unwrap())
            }));
        }
        let mut newly_done_by_parent: HashMap<u32, u32> = HashMap::new();
        let mut releases_of_sink = 0;
        for caller in callers {
            let (parent, completion) = caller.await.unwrap();
            if completion.newly_done {
                *newly_done_by_parent.entry(parent).or_default() += 1;
                if completion.ready.contains(&sink) {
                    releases_of_sink += 1;
                }
            }
            assert!(!completion.run_complete);
        }
        assert_eq!(newly_done_by_parent, (1..=PARENTS).map(|parent| (parent, 1)).collect());
        assert_eq!(releases_of_sink, 1, "exactly one newly done parent releases the sink");
        assert_eq!(gates[0].outstanding(&wide).await.unwrap(), Some(1));
        assert!(gates[1].complete(&wide, sink, &[]).await.unwrap().run_complete);
        delete_all(&gates[0]).await;
    }

    #[tokio::test]
    async fn errors_never_show_the_url_or_the_password() {
        // Nothing listens on port 1: the connection is refused at once.
        let url = "redis://sluice:hunter2secret@127.0.0.1:1/0";
        let mut config = RedisGateConfig::new(&unique_prefix(), Duration::from_secs(60));
        config.connection_retries = 0;
        let error = RedisGate::connect_with_config(url, config).await.unwrap_err();
        let message = error.to_string();
        assert!(error.is_transient(), "{message}");
        assert!(!message.contains("hunter2secret") && !message.contains(url), "{message}");

        let unparsable = "rediss?//sluice:hunter2secret@";
        let message = RedisGate::connect(unparsable, "p", Duration::from_secs(60)).await.unwrap_err().to_string();
        assert!(!message.contains("hunter2secret"), "{message}");

        assert_eq!(
            Secrets { values: vec!["hunter2secret".into()] }.redact("auth hunter2secret refused".into()),
            "auth *** refused"
        );
    }

    #[tokio::test]
    async fn prefixes_that_break_the_hash_tag_are_refused() {
        for prefix in ["", "a{b", "a}b", "a*"] {
            let result = RedisGate::connect(&redis_url(), prefix, Duration::from_secs(60)).await;
            assert!(matches!(result, Err(QueueError::Backend(message)) if message.contains("prefix")), "{prefix:?}");
        }
    }
}
