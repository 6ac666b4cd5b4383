//! The conformance suite: every check runs against `SqliteState` (a temporary file), against
//! `PostgresState` (a fresh database on 127.0.0.1:5432 per test, dropped afterwards) and against
//! `MemoryState` (a fresh store per test), so SQLite and the in-memory store provably behave
//! like PostgreSQL. PostgreSQL being unreachable fails the tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sluice_core::interval::{Interval, IntervalSet, Timestamp};
use sluice_core::model::ModelKind;
use sluice_core::names::{EnvironmentName, ModelName, PlanId, SnapshotId, TaskId, Version};
use sluice_core::plan::{Change, EnvironmentState, Plan, PlannedSnapshot, Restatement};
use sluice_core::snapshot::{Fingerprint, Snapshot};

use crate::{
    AuditEntry, EnvironmentPromotion, FinishedTask, IntervalKey, IntervalRecord, RunFinalization, RunId, RunOutcome,
    RunProgress, RunRecord, RunStart, RunStatus, StateError, StateStore, TaskFailure, TaskOutlook,
};

/// One backend under test: the store as the roles see it, and a way to look at its tables.
pub(crate) struct Backend {
    pub store: Arc<dyn StateStore>,
    pub inspect: Inspect,
}

#[derive(Clone)]
pub(crate) enum Inspect {
    Sqlite(crate::SqliteState),
    Postgres(crate::PostgresState),
    Memory(crate::MemoryState),
}

impl Inspect {
    /// How many interval rows are stored, to prove compaction.
    async fn interval_rows(&self) -> i64 {
        match self {
            Inspect::Sqlite(state) => state.count_rows_for_tests("sluice_intervals").await,
            Inspect::Postgres(state) => state.count_rows_for_tests("sluice_intervals").await,
            Inspect::Memory(state) => state.interval_rows_for_tests(),
        }
    }

    /// Stores interval rows as they are (SQLite, PostgreSQL: no merging with the stored rows, as
    /// concurrent writers can leave them; memory keeps merged ranges only).
    async fn insert_interval_rows(&self, key: &IntervalKey, ranges: &[Interval]) {
        match self {
            Inspect::Sqlite(state) => state.insert_interval_rows_for_tests(key, ranges).await,
            Inspect::Postgres(state) => state.insert_interval_rows_for_tests(key, ranges).await,
            Inspect::Memory(state) => state.insert_interval_rows_for_tests(key, ranges),
        }
    }

    async fn run_rows(&self) -> i64 {
        match self {
            Inspect::Sqlite(state) => state.count_rows_for_tests("sluice_runs").await,
            Inspect::Postgres(state) => state.count_rows_for_tests("sluice_runs").await,
            Inspect::Memory(state) => state.run_rows_for_tests(),
        }
    }
}

pub(crate) mod harness {
    //! Creating and tearing down a backend for one test.

    use std::hash::{BuildHasher, Hasher};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use sqlx::{AssertSqlSafe, Connection, PgConnection};

    use super::{Backend, Inspect};
    use crate::{MemoryState, PostgresState, SqliteState};

    /// The server every PostgreSQL test creates its database on; `SLUICE_TEST_POSTGRES_URL`
    /// overrides it (a URL of a database the user may `CREATE DATABASE` from).
    pub fn admin_url() -> String {
        std::env::var("SLUICE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    fn unique_suffix() -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        hasher.write_u128(nanos);
        format!("{:016x}", hasher.finish())
    }

    pub struct SqliteFixture {
        _folder: tempfile::TempDir,
        pub state: SqliteState,
    }

    impl SqliteFixture {
        pub async fn new() -> SqliteFixture {
            let folder = tempfile::tempdir().unwrap();
            let state = SqliteState::open(folder.path().join(".sluice/state.db")).await.unwrap();
            SqliteFixture { _folder: folder, state }
        }

        pub fn backend(&self) -> Backend {
            Backend { store: Arc::new(self.state.clone()), inspect: Inspect::Sqlite(self.state.clone()) }
        }

        pub async fn finish(self) {
            self.state.close().await;
        }
    }

    pub struct MemoryFixture {
        pub state: MemoryState,
    }

    impl MemoryFixture {
        pub async fn new() -> MemoryFixture {
            MemoryFixture { state: MemoryState::new() }
        }

        /// The store and the inspector share the same tables (a clone shares them).
        pub fn backend(&self) -> Backend {
            Backend { store: Arc::new(self.state.clone()), inspect: Inspect::Memory(self.state.clone()) }
        }

        /// Nothing to close: the tables go when the last clone is dropped.
        pub async fn finish(self) {}
    }

    pub struct PostgresFixture {
        database: String,
        pub state: PostgresState,
    }

    impl PostgresFixture {
        pub async fn new() -> PostgresFixture {
            let admin_url = admin_url();
            let mut admin = PgConnection::connect(&admin_url)
                .await
                .unwrap_or_else(|error| panic!("PostgreSQL must be reachable for the state tests: {error}"));
            let database = format!("sluice_state_test_{}", unique_suffix());
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&mut admin).await.unwrap();
            admin.close().await.unwrap();
            let base = admin_url.rsplit_once('/').map_or(admin_url.as_str(), |(base, _)| base);
            let state = PostgresState::connect(&format!("{base}/{database}")).await.unwrap();
            PostgresFixture { database, state }
        }

        pub fn backend(&self) -> Backend {
            Backend { store: Arc::new(self.state.clone()), inspect: Inspect::Postgres(self.state.clone()) }
        }

        /// Closes the pool and drops the test database.
        pub async fn finish(self) {
            self.state.close().await;
            let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
            sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database)))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
        }
    }
}

/// Generates one `#[tokio::test]` per check and backend. A check that panics still gets its
/// PostgreSQL database dropped. The in-memory store runs on the same multi-threaded runtime as
/// the others, so its checks of concurrent writers exercise its one lock.
macro_rules! conformance_tests {
    ($($check:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let fixture = super::harness::SqliteFixture::new().await;
                    let backend = fixture.backend();
                    let outcome = tokio::spawn(async move { super::$check(backend).await }).await;
                    fixture.finish().await;
                    if let Err(error) = outcome {
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            )*
        }

        mod memory_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let fixture = super::harness::MemoryFixture::new().await;
                    let backend = fixture.backend();
                    let outcome = tokio::spawn(async move { super::$check(backend).await }).await;
                    fixture.finish().await;
                    if let Err(error) = outcome {
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            )*
        }

        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let fixture = super::harness::PostgresFixture::new().await;
                    let backend = fixture.backend();
                    let outcome = tokio::spawn(async move { super::$check(backend).await }).await;
                    fixture.finish().await;
                    if let Err(error) = outcome {
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            )*
        }
    };
}

conformance_tests!(
    snapshots_round_trip,
    snapshots_in_use_are_not_deleted,
    environment_compare_and_swap,
    previous_state_is_kept_for_rollback,
    environments_are_listed,
    begin_run_pushes_plan_snapshots_lease_and_run,
    stale_plan_creates_nothing,
    held_lease_names_its_holder,
    expired_lease_is_taken_over,
    same_plan_takes_over_its_own_lease,
    a_restatement_forgets_its_intervals_on_its_first_run_only,
    concurrent_begin_runs_exactly_one_wins,
    lease_renew_and_release,
    intervals_are_compacted,
    concurrent_interval_writers_lose_nothing,
    intervals_for_many_keys_and_removal,
    plans_round_trip,
    run_lifecycle,
    task_bookkeeping,
    finished_tasks_are_recorded_in_one_batch,
    breaker_trip_and_reset,
    audit_log_is_newest_first,
    finalize_run_records_outcome_releases_lease_and_audits,
    a_promoting_run_ends_only_promoted,
    finalize_run_twice_keeps_the_first_outcome,
    finalize_run_promotes_the_environment,
    finalize_run_accepts_an_environment_already_promoted,
    finalize_run_on_a_stale_environment_writes_nothing,
    finalize_unknown_run_is_not_found,
    concurrent_finalize_runs_write_one_audit_row,
    superseding_begin_run_audits_and_resets_the_breaker,
    task_outlook_reads_the_run_status,
    task_outlook_reads_the_breaker,
    task_outlook_reads_recorded_intervals,
    task_outlook_merges_adjacent_and_overlapping_rows,
    claim_removes_intervals_and_lists_tables_until_released,
    claim_is_idempotent,
    begin_run_of_a_plan_using_a_claimed_table_writes_nothing,
    intervals_of_a_claimed_table_are_not_recorded,
    claim_after_a_run_began_or_ended_changes_nothing,
    claim_on_a_stale_environment_map_changes_nothing,
    concurrent_claims_and_begin_runs_exclude_each_other,
    concurrent_claims_and_interval_writes_leave_no_interval,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn env(name: &str) -> EnvironmentName {
    EnvironmentName::parse(name).unwrap()
}

fn model(name: &str) -> ModelName {
    ModelName::parse(name).unwrap()
}

fn plan_id(id: &str) -> PlanId {
    PlanId(id.to_string())
}

fn run_id(id: &str) -> RunId {
    RunId(id.to_string())
}

fn hour(n: i64) -> Timestamp {
    Timestamp(1_700_000_000 / 3600 * 3600 + n * 3600)
}

fn interval(start: i64, end: i64) -> Interval {
    Interval { start: hour(start), end: hour(end) }
}

fn snapshot(name: &str, version: &str) -> Snapshot {
    Snapshot {
        id: SnapshotId(format!("{name}@{version}")),
        name: model(name),
        fingerprint: Fingerprint {
            data_hash: version.to_string(),
            metadata_hash: "0".repeat(16),
            parent_data_hash: "1".repeat(16),
            parent_metadata_hash: "2".repeat(16),
        },
        version: Version(version.to_string()),
        kind: ModelKind::IncrementalByTimeRange {
            time_column: "ts".to_string(),
            time_format: None,
            batch_size: Some(24),
            batch_concurrency: None,
            lookback: 0,
            forward_only: false,
        },
        cron: "@hourly".to_string(),
        start: hour(0),
        end: None,
        gateway: "local".to_string(),
        dialect: "duckdb".to_string(),
        columns: vec![("id".to_string(), "INT".to_string())],
        owner: Some("data".to_string()),
        description: None,
        tags: vec![],
        grain: vec![],
        parents: vec![],
        normalized_query: Some("SELECT 1 AS id".to_string()),
        pretty_query: Some("SELECT\n  1 AS id".to_string()),
        rendered_query: Some("SELECT 1 AS id".to_string()),
        pre_statements: vec![],
        post_statements: vec![],
        seed: None,
        change_category: None,
        self_referencing: false,
        disable_restatement: false,
        audits: Vec::new(),
    }
}

fn plan(id: &str, environment: &str, previous: Option<&str>, created_at: i64, snapshots: &[Snapshot]) -> Plan {
    Plan {
        id: plan_id(id),
        environment: env(environment),
        previous_plan_id: previous.map(plan_id),
        created_at: Timestamp(created_at),
        forward_only: false,
        snapshots: snapshots
            .iter()
            .map(|snapshot| PlannedSnapshot {
                snapshot: snapshot.clone(),
                change: Change::Added,
                previous: None,
                missing_ranges: vec![interval(0, 24)],
                missing_interval_count: 24,
                batches: vec![],
                materialized_parents: vec![],
                promoted: true,
            })
            .collect(),
        removed: vec![],
        environment_exists: previous.is_some(),
        environment_ttl_seconds: None,
        notification_webhook: None,
        window: Default::default(),
        restatements: Vec::new(),
        statements: Default::default(),
        skip_backfill: false,
    }
}

fn state(environment: &str, plan: Option<&str>, snapshots: &[Snapshot]) -> EnvironmentState {
    EnvironmentState { name: env(environment), plan_id: plan.map(plan_id), snapshots: snapshots.to_vec() }
}

async fn promote(
    store: &dyn StateStore,
    new_state: &EnvironmentState,
    expected: Option<&str>,
    now: i64,
) -> Result<(), StateError> {
    let expected = expected.map(plan_id);
    store
        .promote_environment(EnvironmentPromotion {
            state: new_state,
            expected_plan: expected.as_ref(),
            expires_at: None,
            now: Timestamp(now),
        })
        .await
}

async fn begin(store: &dyn StateStore, plan: &Plan, run: &str, now: i64) -> Result<crate::RunRecord, StateError> {
    let snapshots: Vec<Snapshot> = plan.snapshots.iter().map(|planned| planned.snapshot.clone()).collect();
    let run_id = run_id(run);
    store
        .begin_run(RunStart {
            plan,
            run_id: &run_id,
            snapshots: &snapshots,
            lease_ttl_seconds: 60,
            now: Timestamp(now),
            user: "alice",
        })
        .await
}

fn outcome(status: RunStatus, error: Option<&str>, finished_at: i64) -> RunOutcome {
    RunOutcome { status, error: error.map(str::to_string), finished_at: Timestamp(finished_at) }
}

/// The audit row a promoter writes for `run` ending with `outcome`.
fn audit_of(run: &RunRecord, outcome: &RunOutcome, text: &str) -> AuditEntry {
    AuditEntry {
        plan_id: run.plan_id.clone(),
        run_id: run.id.clone(),
        environment: run.environment.clone(),
        user: run.user.clone(),
        started_at: run.started_at,
        finished_at: outcome.finished_at,
        intervals: 24,
        models: 1,
        retries: 0,
        outcome: text.to_string(),
    }
}

async fn finalize(
    store: &dyn StateStore,
    run: &RunId,
    outcome: &RunOutcome,
    promotion: Option<EnvironmentPromotion<'_>>,
    audit: &AuditEntry,
) -> Result<RunRecord, StateError> {
    store.finalize_run(RunFinalization { run_id: run, outcome, promotion, audit }).await
}

fn task(n: u8) -> TaskId {
    TaskId([n; 16])
}

/// A deterministic permutation (xorshift), so the order is shuffled but reproducible.
fn shuffled(count: i64, seed: u64) -> Vec<i64> {
    let mut values: Vec<i64> = (0..count).collect();
    let mut state = seed;
    for index in (1..values.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let other = (state % (index as u64 + 1)) as usize;
        values.swap(index, other);
    }
    values
}

// ---------------------------------------------------------------------------------------------
// Checks

async fn snapshots_round_trip(backend: Backend) {
    let store = &*backend.store;
    let a = snapshot("sushi.orders", "aaaa");
    let b = snapshot("sushi.items", "bbbb");
    let c = snapshot("sushi.customers", "cccc");
    store.put_snapshots(&[a.clone(), b.clone(), c.clone(), a.clone()]).await.unwrap();

    // Idempotent: a stored id keeps its first body.
    let mut changed_a = a.clone();
    changed_a.owner = Some("someone else".to_string());
    store.put_snapshots(&[changed_a]).await.unwrap();
    store.put_snapshots(&[]).await.unwrap();

    let fetched = store.get_snapshots(&[a.id.clone(), b.id.clone(), SnapshotId("x.y@none".into())]).await.unwrap();
    assert_eq!(fetched, BTreeMap::from([(a.id.clone(), a.clone()), (b.id.clone(), b.clone())]));
    assert!(store.get_snapshots(&[]).await.unwrap().is_empty());

    let all = store.all_snapshots().await.unwrap();
    let mut expected = vec![a.clone(), b.clone(), c.clone()];
    expected.sort_by(|left, right| left.id.cmp(&right.id));
    assert_eq!(all, expected);

    store.delete_snapshots(std::slice::from_ref(&c.id)).await.unwrap();
    let ids: Vec<SnapshotId> = store.all_snapshots().await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);
}

async fn snapshots_in_use_are_not_deleted(backend: Backend) {
    let store = &*backend.store;
    let used = snapshot("sushi.orders", "aaaa");
    let replaced = snapshot("sushi.orders", "bbbb");
    let unused = snapshot("sushi.items", "cccc");
    store.put_snapshots(&[used.clone(), replaced.clone(), unused.clone()]).await.unwrap();
    promote(store, &state("dev", Some("p1"), std::slice::from_ref(&replaced)), None, 10).await.unwrap();
    promote(store, &state("dev", Some("p2"), std::slice::from_ref(&used)), Some("p1"), 20).await.unwrap();

    // The current state and the rollback state both protect their snapshots.
    for protected in [&used, &replaced] {
        let error = store.delete_snapshots(&[unused.id.clone(), protected.id.clone()]).await.unwrap_err();
        match error {
            StateError::SnapshotInUse { snapshot, environment } => {
                assert_eq!(snapshot, protected.id);
                assert_eq!(environment, env("dev"));
            }
            other => panic!("expected SnapshotInUse, got {other:?}"),
        }
    }
    // Nothing was deleted by the refused calls.
    assert_eq!(store.all_snapshots().await.unwrap().len(), 3);
    store.delete_environment(&env("dev")).await.unwrap();
    store.delete_snapshots(&[used.id.clone(), replaced.id.clone()]).await.unwrap();
    assert_eq!(store.all_snapshots().await.unwrap(), vec![unused]);
}

async fn environment_compare_and_swap(backend: Backend) {
    let store = &*backend.store;
    let dev = env("dev");
    assert_eq!(store.get_environment(&dev).await.unwrap(), None);

    let first = state("dev", Some("p1"), &[snapshot("sushi.orders", "aaaa"), snapshot("sushi.items", "bbbb")]);
    promote(store, &first, None, 100).await.unwrap();
    let record = store.get_environment(&dev).await.unwrap().unwrap();
    assert_eq!(record.state, first);
    assert_eq!(record.previous, None);
    assert_eq!(record.updated_at, Timestamp(100));
    assert_eq!(record.expires_at, None);

    // A second creation from "no plan" is stale: the environment shows p1 now.
    let rival = state("dev", Some("p9"), &[snapshot("sushi.orders", "zzzz")]);
    match promote(store, &rival, None, 110).await.unwrap_err() {
        StateError::StaleEnvironment { environment, expected, actual } => {
            assert_eq!(environment, dev);
            assert_eq!(expected, None);
            assert_eq!(actual, Some(plan_id("p1")));
        }
        other => panic!("expected StaleEnvironment, got {other:?}"),
    }
    // So is a swap expecting another plan; its message names both plans.
    let error = promote(store, &rival, Some("p0"), 110).await.unwrap_err();
    assert!(
        matches!(&error, StateError::StaleEnvironment { expected: Some(p), actual: Some(a), .. } if p.0 == "p0" && a.0 == "p1")
    );
    assert!(error.to_string().contains("p0") && error.to_string().contains("p1"), "{error}");
    assert_eq!(store.get_environment(&dev).await.unwrap().unwrap().state, first, "a refused swap changes nothing");

    let second = state("dev", Some("p2"), &[snapshot("sushi.orders", "cccc")]);
    store
        .promote_environment(EnvironmentPromotion {
            state: &second,
            expected_plan: Some(&plan_id("p1")),
            expires_at: Some(Timestamp(5_000)),
            now: Timestamp(200),
        })
        .await
        .unwrap();
    let record = store.get_environment(&dev).await.unwrap().unwrap();
    assert_eq!(record.state, second);
    assert_eq!(record.previous, Some(first));
    assert_eq!(record.expires_at, Some(Timestamp(5_000)));
    assert_eq!(record.updated_at, Timestamp(200));

    store.delete_environment(&dev).await.unwrap();
    store.delete_environment(&dev).await.unwrap();
    assert_eq!(store.get_environment(&dev).await.unwrap(), None);
}

async fn previous_state_is_kept_for_rollback(backend: Backend) {
    let store = &*backend.store;
    let prod = EnvironmentName::prod();
    let v1 = state("prod", Some("p1"), &[snapshot("sushi.orders", "aaaa")]);
    let v2 = state("prod", Some("p2"), &[snapshot("sushi.orders", "bbbb"), snapshot("sushi.items", "cccc")]);
    promote(store, &v1, None, 1).await.unwrap();
    promote(store, &v2, Some("p1"), 2).await.unwrap();

    // Rollback: promote what `previous` holds, swapping against the plan shown now.
    let record = store.get_environment(&prod).await.unwrap().unwrap();
    let rollback_to = record.previous.clone().unwrap();
    assert_eq!(rollback_to, v1);
    promote(store, &rollback_to, Some("p2"), 3).await.unwrap();
    let record = store.get_environment(&prod).await.unwrap().unwrap();
    assert_eq!(record.state, v1);
    assert_eq!(record.previous, Some(v2));
}

async fn environments_are_listed(backend: Backend) {
    let store = &*backend.store;
    assert!(store.list_environments().await.unwrap().is_empty());
    let prod = state("prod", Some("p1"), &[snapshot("sushi.orders", "aaaa")]);
    let dev = state("dev", Some("p2"), &[snapshot("sushi.orders", "bbbb")]);
    let empty = state("empty", None, &[]);
    promote(store, &prod, None, 1).await.unwrap();
    promote(store, &dev, None, 2).await.unwrap();
    promote(store, &empty, None, 3).await.unwrap();
    let listed: Vec<EnvironmentState> =
        store.list_environments().await.unwrap().into_iter().map(|record| record.state).collect();
    assert_eq!(listed, vec![dev, empty.clone(), prod]);
    assert_eq!(store.get_environment(&env("empty")).await.unwrap().unwrap().state, empty);
}

async fn begin_run_pushes_plan_snapshots_lease_and_run(backend: Backend) {
    let store = &*backend.store;
    let snapshots = [snapshot("sushi.orders", "aaaa"), snapshot("sushi.items", "bbbb")];
    let plan = plan("p1", "dev", None, 50, &snapshots);
    let run = begin(store, &plan, "p1-1", 1_000).await.unwrap();
    assert_eq!(run.id, run_id("p1-1"));
    assert_eq!(run.plan_id, plan.id);
    assert_eq!(run.environment, env("dev"));
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.started_at, Timestamp(1_000));
    assert_eq!(run.user, "alice");
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(run.clone()));

    assert_eq!(store.get_plan(&plan.id).await.unwrap(), Some(plan.clone()));
    let ids: Vec<SnapshotId> = snapshots.iter().map(|s| s.id.clone()).collect();
    assert_eq!(store.get_snapshots(&ids).await.unwrap().len(), 2);
    let lease = store.get_lease(&env("dev")).await.unwrap().unwrap();
    assert_eq!(lease.plan_id, plan.id);
    assert_eq!(lease.run_id, run.id);
    assert_eq!(lease.expires_at, Timestamp(1_060));

    // The same run id twice is refused, and changes nothing.
    assert!(matches!(begin(store, &plan, "p1-1", 1_001).await, Err(StateError::RunExists { .. })));
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(run));
}

async fn stale_plan_creates_nothing(backend: Backend) {
    let store = &*backend.store;
    promote(store, &state("dev", Some("p1"), &[snapshot("sushi.orders", "aaaa")]), None, 1).await.unwrap();
    let fresh = snapshot("sushi.orders", "ffff");
    let stale = plan("p2", "dev", Some("p0"), 60, std::slice::from_ref(&fresh));
    match begin(store, &stale, "p2-1", 1_000).await.unwrap_err() {
        StateError::StaleEnvironment { environment, expected, actual } => {
            assert_eq!(environment, env("dev"));
            assert_eq!(expected, Some(plan_id("p0")));
            assert_eq!(actual, Some(plan_id("p1")));
        }
        other => panic!("expected StaleEnvironment, got {other:?}"),
    }
    // A plan for an environment that does not exist yet, expecting one, is stale too.
    let stale_new = plan("p3", "fresh", Some("p1"), 60, std::slice::from_ref(&fresh));
    assert!(matches!(
        begin(store, &stale_new, "p3-1", 1_000).await,
        Err(StateError::StaleEnvironment { actual: None, .. })
    ));

    // Nothing of either attempt was written: no plan, no snapshot, no lease, no run.
    for id in ["p2", "p3"] {
        assert_eq!(store.get_plan(&plan_id(id)).await.unwrap(), None);
        assert!(store.runs_of_plan(&plan_id(id)).await.unwrap().is_empty());
    }
    assert!(store.get_snapshots(std::slice::from_ref(&fresh.id)).await.unwrap().is_empty());
    assert_eq!(store.get_lease(&env("dev")).await.unwrap(), None);
    assert_eq!(store.get_lease(&env("fresh")).await.unwrap(), None);
    assert_eq!(backend.inspect.run_rows().await, 0);
}

async fn held_lease_names_its_holder(backend: Backend) {
    let store = &*backend.store;
    let first = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let second = plan("pb", "dev", None, 2, &[snapshot("sushi.orders", "bbbb")]);
    begin(store, &first, "pa-1", 1_000).await.unwrap();
    let error = begin(store, &second, "pb-1", 1_059).await.unwrap_err();
    match &error {
        StateError::LeaseHeld { environment, holder_plan, holder_run, expires_at } => {
            assert_eq!(environment, &env("dev"));
            assert_eq!(holder_plan, &plan_id("pa"));
            assert_eq!(holder_run, &run_id("pa-1"));
            assert_eq!(expires_at, &Timestamp(1_060));
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert!(error.to_string().contains("pa-1"), "{error}");
    assert!(!error.is_transient());
    assert_eq!(store.get_plan(&plan_id("pb")).await.unwrap(), None);
    assert_eq!(store.get_run(&run_id("pb-1")).await.unwrap(), None);
    assert_eq!(store.get_lease(&env("dev")).await.unwrap().unwrap().run_id, run_id("pa-1"));
    // Another environment is independent.
    let other = plan("pc", "other", None, 3, &[snapshot("sushi.orders", "aaaa")]);
    begin(store, &other, "pc-1", 1_010).await.unwrap();
}

async fn expired_lease_is_taken_over(backend: Backend) {
    let store = &*backend.store;
    let first = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let second = plan("pb", "dev", None, 2, &[snapshot("sushi.orders", "bbbb")]);
    begin(store, &first, "pa-1", 1_000).await.unwrap();
    // The lease runs out at 1060: a run starting then takes it over.
    let run = begin(store, &second, "pb-1", 1_060).await.unwrap();
    assert_eq!(run.status, RunStatus::Running);
    let lease = store.get_lease(&env("dev")).await.unwrap().unwrap();
    assert_eq!((lease.plan_id, lease.run_id, lease.expires_at), (plan_id("pb"), run_id("pb-1"), Timestamp(1_120)));

    // The run that lost its lease is marked aborted, and learns it when it tries to renew.
    let lost = store.get_run(&run_id("pa-1")).await.unwrap().unwrap();
    assert_eq!(lost.status, RunStatus::Aborted);
    assert_eq!(lost.finished_at, Some(Timestamp(1_060)));
    assert!(lost.error.unwrap().contains("pb-1"));
    match store.renew_lease(&env("dev"), &run_id("pa-1"), 60, Timestamp(1_061)).await.unwrap_err() {
        StateError::LeaseHeld { holder_run, .. } => assert_eq!(holder_run, run_id("pb-1")),
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
}

async fn same_plan_takes_over_its_own_lease(backend: Backend) {
    let store = &*backend.store;
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    begin(store, &plan, "pa-1", 1_000).await.unwrap();
    // A resume of the same plan does not wait for the lease to expire; it fences the old run.
    begin(store, &plan, "pa-2", 1_010).await.unwrap();
    assert_eq!(store.get_lease(&env("dev")).await.unwrap().unwrap().run_id, run_id("pa-2"));
    let runs = store.runs_of_plan(&plan.id).await.unwrap();
    let statuses: Vec<(RunId, RunStatus)> = runs.into_iter().map(|run| (run.id, run.status)).collect();
    assert_eq!(statuses, vec![(run_id("pa-1"), RunStatus::Aborted), (run_id("pa-2"), RunStatus::Running)]);
    let running: Vec<RunId> = store.running_runs().await.unwrap().into_iter().map(|run| run.id).collect();
    assert_eq!(running, vec![run_id("pa-2")]);
}

async fn a_restatement_forgets_its_intervals_on_its_first_run_only(backend: Backend) {
    let store = &*backend.store;
    let orders = snapshot("sushi.orders", "aaaa");
    let items = snapshot("sushi.items", "bbbb");
    let key = |snapshot: &Snapshot| (snapshot.name.clone(), snapshot.version.clone());
    let record = |snapshot: &Snapshot, start, end| IntervalRecord {
        name: snapshot.name.clone(),
        version: snapshot.version.clone(),
        interval: interval(start, end),
    };
    // Two rows for orders (as concurrent writers may leave them), one for items.
    store.record_intervals(&[record(&orders, 0, 10)]).await.unwrap();
    store.record_intervals(&[record(&orders, 10, 24), record(&items, 0, 24)]).await.unwrap();
    let mut restating = plan("pr", "prod", None, 1, &[orders.clone(), items.clone()]);
    restating.restatements = vec![
        Restatement { name: orders.name.clone(), version: orders.version.clone(), interval: interval(5, 12) },
        Restatement { name: items.name.clone(), version: items.version.clone(), interval: interval(20, 30) },
    ];
    begin(store, &restating, "pr-1", 1_000).await.unwrap();
    let recorded = store.get_intervals(&[key(&orders), key(&items)]).await.unwrap();
    assert_eq!(recorded[&key(&orders)].ranges(), &[interval(0, 5), interval(12, 24)]);
    assert_eq!(recorded[&key(&items)].ranges(), &[interval(0, 20)]);
    // The run writes some of them again; its resume forgets nothing more.
    store.record_intervals(&[record(&orders, 5, 8)]).await.unwrap();
    begin(store, &restating, "pr-2", 1_010).await.unwrap();
    let recorded = store.get_intervals(&[key(&orders), key(&items)]).await.unwrap();
    assert_eq!(recorded[&key(&orders)].ranges(), &[interval(0, 8), interval(12, 24)]);
    assert_eq!(recorded[&key(&items)].ranges(), &[interval(0, 20)]);
}

async fn concurrent_begin_runs_exactly_one_wins(backend: Backend) {
    let snapshots = [snapshot("sushi.orders", "aaaa"), snapshot("sushi.items", "bbbb")];
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut attempts = tokio::task::JoinSet::new();
    for index in 0..8 {
        let store = Arc::clone(&backend.store);
        let barrier = Arc::clone(&barrier);
        let plan = plan(&format!("p{index}"), "prod", None, index, &snapshots);
        attempts.spawn(async move {
            barrier.wait().await;
            begin(&*store, &plan, &format!("p{index}-1"), 1_000).await
        });
    }
    let mut winners = Vec::new();
    let mut refusals = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        match joined.unwrap() {
            Ok(run) => winners.push(run),
            Err(StateError::LeaseHeld { holder_run, .. }) => refusals.push(holder_run),
            Err(other) => panic!("expected a run or LeaseHeld, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one begin_run wins: {winners:?}");
    let winner = &winners[0];
    assert_eq!(refusals.len(), 7);
    assert!(refusals.iter().all(|holder| holder == &winner.id), "every refusal names the winner");
    assert_eq!(backend.inspect.run_rows().await, 1);
    assert_eq!(backend.store.get_lease(&EnvironmentName::prod()).await.unwrap().unwrap().run_id, winner.id);
}

async fn lease_renew_and_release(backend: Backend) {
    let store = &*backend.store;
    let dev = env("dev");
    let first = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let second = plan("pb", "dev", None, 2, &[snapshot("sushi.orders", "bbbb")]);
    begin(store, &first, "pa-1", 1_000).await.unwrap();

    let renewed = store.renew_lease(&dev, &run_id("pa-1"), 120, Timestamp(1_050)).await.unwrap();
    assert_eq!(renewed.expires_at, Timestamp(1_170));
    assert!(matches!(begin(store, &second, "pb-1", 1_100).await, Err(StateError::LeaseHeld { .. })));
    assert!(matches!(
        store.renew_lease(&dev, &run_id("pa-1"), 0, Timestamp(1_050)).await,
        Err(StateError::Invalid { .. })
    ));

    // Releasing someone else's lease does nothing; releasing one's own frees the environment.
    store.release_lease(&dev, &run_id("pb-1")).await.unwrap();
    assert_eq!(store.get_lease(&dev).await.unwrap().unwrap().run_id, run_id("pa-1"));
    store.release_lease(&dev, &run_id("pa-1")).await.unwrap();
    store.release_lease(&dev, &run_id("pa-1")).await.unwrap();
    assert_eq!(store.get_lease(&dev).await.unwrap(), None);
    assert!(matches!(
        store.renew_lease(&dev, &run_id("pa-1"), 60, Timestamp(1_101)).await,
        Err(StateError::NotFound { .. })
    ));
    begin(store, &second, "pb-1", 1_101).await.unwrap();
}

async fn intervals_are_compacted(backend: Backend) {
    let store = &*backend.store;
    let name = model("sushi.orders");
    let version = Version("aaaa".to_string());
    let hours = shuffled(10_000, 0x9e37_79b9_7f4a_7c15);
    for batch in hours.chunks(100) {
        let records: Vec<IntervalRecord> = batch
            .iter()
            .map(|&n| IntervalRecord { name: name.clone(), version: version.clone(), interval: interval(n, n + 1) })
            .collect();
        store.record_intervals(&records).await.unwrap();
    }
    let rows = backend.inspect.interval_rows().await;
    assert!(rows <= 5, "10,000 hourly intervals should compact to a handful of rows, found {rows}");
    let key = (name, version);
    let intervals = store.get_intervals(std::slice::from_ref(&key)).await.unwrap();
    assert_eq!(intervals[&key].ranges(), &[interval(0, 10_000)]);

    // Recording what is already there changes nothing; an empty batch is fine.
    store
        .record_intervals(&[IntervalRecord { name: key.0.clone(), version: key.1.clone(), interval: interval(5, 7) }])
        .await
        .unwrap();
    store.record_intervals(&[]).await.unwrap();
    assert_eq!(backend.inspect.interval_rows().await, 1);
    assert_eq!(store.get_intervals(std::slice::from_ref(&key)).await.unwrap()[&key].ranges(), &[interval(0, 10_000)]);
}

async fn concurrent_interval_writers_lose_nothing(backend: Backend) {
    let name = model("sushi.orders");
    let version = Version("aaaa".to_string());
    let writers = 8;
    let barrier = Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let store = Arc::clone(&backend.store);
        let barrier = Arc::clone(&barrier);
        let (name, version) = (name.clone(), version.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            // Writer w records hours w, w + 8, w + 16, ...: every batch touches the others' rows.
            for round in 0..20_i64 {
                let records: Vec<IntervalRecord> = (0..5_i64)
                    .map(|step| {
                        let n = (round * 5 + step) * writers as i64 + writer as i64;
                        IntervalRecord { name: name.clone(), version: version.clone(), interval: interval(n, n + 1) }
                    })
                    .collect();
                store.record_intervals(&records).await.unwrap();
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let key = (name, version);
    let intervals = backend.store.get_intervals(std::slice::from_ref(&key)).await.unwrap();
    assert_eq!(intervals[&key].ranges(), &[interval(0, 800)], "every recorded hour is still there");
}

async fn intervals_for_many_keys_and_removal(backend: Backend) {
    let store = &*backend.store;
    let mut records = Vec::new();
    let mut keys = Vec::new();
    for index in 0..50_i64 {
        let key = (model(&format!("sushi.table_{index}")), Version(format!("v{index}")));
        records.push(IntervalRecord { name: key.0.clone(), version: key.1.clone(), interval: interval(0, index + 1) });
        records.push(IntervalRecord {
            name: key.0.clone(),
            version: key.1.clone(),
            interval: interval(100, 100 + index + 1),
        });
        keys.push(key);
    }
    // Another version of the same model is another table.
    let other_version = (model("sushi.table_0"), Version("other".to_string()));
    records.push(IntervalRecord {
        name: other_version.0.clone(),
        version: other_version.1.clone(),
        interval: interval(7, 8),
    });
    store.record_intervals(&records).await.unwrap();

    let unknown = (model("sushi.unknown"), Version("v0".to_string()));
    let mut wanted = keys.clone();
    wanted.push(unknown.clone());
    wanted.push(other_version.clone());
    let fetched = store.get_intervals(&wanted).await.unwrap();
    assert_eq!(fetched.len(), 52);
    for (index, key) in keys.iter().enumerate() {
        let index = index as i64;
        assert_eq!(fetched[key].ranges(), &[interval(0, index + 1), interval(100, 100 + index + 1)], "{key:?}");
    }
    assert!(fetched[&unknown].is_empty());
    assert_eq!(fetched[&other_version].ranges(), &[interval(7, 8)]);
    assert!(store.get_intervals(&[]).await.unwrap().is_empty());

    store.remove_intervals(&keys[..25]).await.unwrap();
    let fetched = store.get_intervals(&wanted).await.unwrap();
    for key in &keys[..25] {
        assert!(fetched[key].is_empty(), "{key:?} was removed");
    }
    for key in &keys[25..] {
        assert_eq!(fetched[key].ranges().len(), 2, "{key:?} was kept");
    }
    assert_eq!(fetched[&other_version].ranges(), &[interval(7, 8)]);
    let expected: IntervalSet = [interval(7, 8)].into_iter().collect();
    assert_eq!(store.get_intervals(std::slice::from_ref(&other_version)).await.unwrap()[&other_version], expected);
}

async fn plans_round_trip(backend: Backend) {
    let store = &*backend.store;
    let snapshots = [snapshot("sushi.orders", "aaaa")];
    let old = plan("p-old", "dev", None, 100, &snapshots);
    let newest = plan("p-new", "dev", Some("p-old"), 300, &snapshots);
    let middle = plan("p-mid", "dev", Some("p-old"), 200, &snapshots);
    let elsewhere = plan("p-prod", "prod", None, 400, &snapshots);
    for plan in [&old, &newest, &middle, &elsewhere, &old] {
        store.put_plan(plan).await.unwrap();
    }
    assert_eq!(store.get_plan(&newest.id).await.unwrap(), Some(newest.clone()));
    assert_eq!(store.get_plan(&plan_id("p-none")).await.unwrap(), None);
    let listed = store.list_plans(&env("dev")).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|summary| summary.id.0.as_str()).collect();
    assert_eq!(ids, vec!["p-new", "p-mid", "p-old"]);
    assert_eq!(listed[0].created_at, Timestamp(300));
    assert_eq!(listed[0].previous_plan_id, Some(plan_id("p-old")));
    assert_eq!(listed[0].environment, env("dev"));
    assert!(store.list_plans(&env("nothing")).await.unwrap().is_empty());
}

async fn run_lifecycle(backend: Backend) {
    let store = &*backend.store;
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let first = begin(store, &plan, "pa-1", 1_000).await.unwrap();

    store.add_run_progress(&first.id, RunProgress { tasks_done: 2, intervals_done: 48, retries: 1 }).await.unwrap();
    store.add_run_progress(&first.id, RunProgress { tasks_done: 1, intervals_done: 24, retries: 0 }).await.unwrap();
    let progressed = store.get_run(&first.id).await.unwrap().unwrap();
    assert_eq!((progressed.tasks_done, progressed.intervals_done, progressed.retries), (3, 72, 1));

    let failed = RunOutcome {
        status: RunStatus::Failed,
        error: Some("sushi.orders: relation x does not exist".to_string()),
        finished_at: Timestamp(1_100),
    };
    store.finish_run(&first.id, failed.clone()).await.unwrap();
    store.finish_run(&first.id, failed.clone()).await.unwrap();
    let finished = store.get_run(&first.id).await.unwrap().unwrap();
    assert_eq!(finished.status, RunStatus::Failed);
    assert_eq!(finished.finished_at, Some(Timestamp(1_100)));
    assert_eq!(finished.error, failed.error);
    let succeeded = RunOutcome { status: RunStatus::Succeeded, error: None, finished_at: Timestamp(1_200) };
    assert!(matches!(
        store.finish_run(&first.id, succeeded.clone()).await,
        Err(StateError::RunFinished { status: RunStatus::Failed, .. })
    ));
    assert!(matches!(
        store.finish_run(&first.id, RunOutcome { status: RunStatus::Running, ..succeeded.clone() }).await,
        Err(StateError::Invalid { .. })
    ));
    assert!(matches!(store.finish_run(&run_id("nope"), succeeded.clone()).await, Err(StateError::NotFound { .. })));
    assert!(matches!(
        store.add_run_progress(&run_id("nope"), RunProgress::default()).await,
        Err(StateError::NotFound { .. })
    ));

    // A resume: the second run of the same plan.
    store.release_lease(&env("dev"), &first.id).await.unwrap();
    let second = begin(store, &plan, "pa-2", 1_300).await.unwrap();
    store.finish_run(&second.id, succeeded.clone()).await.unwrap();
    let runs: Vec<RunId> = store.runs_of_plan(&plan.id).await.unwrap().into_iter().map(|run| run.id).collect();
    assert_eq!(runs, vec![first.id.clone(), second.id.clone()]);
    let latest = store.latest_run(&plan.id).await.unwrap().unwrap();
    assert_eq!(latest.id, second.id);
    assert_eq!(latest.status, RunStatus::Succeeded);
    assert_eq!(store.latest_run(&plan_id("nope")).await.unwrap(), None);
    assert_eq!(store.get_run(&run_id("nope")).await.unwrap(), None);
}

async fn task_bookkeeping(backend: Backend) {
    let store = &*backend.store;
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let first = begin(store, &plan, "pa-1", 1_000).await.unwrap();
    store.record_task_done(&first.id, &[task(1), task(2), task(2)]).await.unwrap();
    store.record_task_done(&first.id, &[task(2), task(3)]).await.unwrap();
    store.record_task_done(&first.id, &[task(3)]).await.unwrap();
    store.record_task_done(&first.id, &[]).await.unwrap();
    assert_eq!(store.done_tasks(&first.id).await.unwrap(), BTreeSet::from([task(1), task(2), task(3)]));
    assert!(matches!(store.record_task_done(&run_id("nope"), &[task(1)]).await, Err(StateError::NotFound { .. })));

    let failure = TaskFailure {
        task_id: task(9),
        model: model("sushi.orders"),
        interval: interval(0, 24),
        error: "division by zero".to_string(),
        attempts: 3,
    };
    let other_failure = TaskFailure { task_id: task(8), error: "timeout".to_string(), ..failure.clone() };
    store.record_task_failure(&first.id, &failure).await.unwrap();
    store.record_task_failure(&first.id, &other_failure).await.unwrap();
    let repeated = TaskFailure { attempts: 5, error: "division by zero again".to_string(), ..failure.clone() };
    store.record_task_failure(&first.id, &repeated).await.unwrap();
    assert_eq!(store.task_failures(&first.id).await.unwrap(), vec![repeated, other_failure]);
    assert!(matches!(store.record_task_failure(&run_id("nope"), &failure).await, Err(StateError::NotFound { .. })));

    // A resumed run sees what every run of the plan finished.
    let second = begin(store, &plan, "pa-2", 1_100).await.unwrap();
    store.record_task_done(&second.id, &[task(3), task(4)]).await.unwrap();
    assert_eq!(store.done_tasks(&second.id).await.unwrap(), BTreeSet::from([task(3), task(4)]));
    assert_eq!(store.done_tasks_of_plan(&plan.id).await.unwrap(), BTreeSet::from([task(1), task(2), task(3), task(4)]));
    assert!(store.task_failures(&second.id).await.unwrap().is_empty());
    assert!(store.done_tasks_of_plan(&plan_id("nope")).await.unwrap().is_empty());
}

async fn finished_tasks_are_recorded_in_one_batch(backend: Backend) {
    let store = &*backend.store;
    let first_plan = plan("pf", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let second_plan = plan("pg", "qa", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let first = begin(store, &first_plan, "pf-1", 1_000).await.unwrap();
    let second = begin(store, &second_plan, "pg-1", 1_000).await.unwrap();
    let key = (model("sushi.orders"), Version("aaaa".to_string()));
    let finished = |run: &crate::RunRecord, n: u8, hour: Option<i64>, retries: u64| FinishedTask {
        run_id: run.id.clone(),
        task_id: task(n),
        interval: hour.map(|hour| IntervalRecord {
            name: key.0.clone(),
            version: key.1.clone(),
            interval: interval(hour, hour + 1),
        }),
        intervals: 1,
        retries,
    };
    // Two runs in one batch; a task listed twice counts once; one found its interval recorded.
    store
        .finish_tasks(&[
            finished(&first, 1, Some(0), 2),
            finished(&first, 2, Some(1), 0),
            finished(&first, 2, Some(1), 0),
            finished(&second, 1, None, 0),
        ])
        .await
        .unwrap();
    // Finished again (a redelivery): recorded once, counted once.
    store.finish_tasks(&[finished(&first, 1, Some(0), 5), finished(&first, 3, Some(2), 0)]).await.unwrap();
    assert_eq!(store.done_tasks(&first.id).await.unwrap(), BTreeSet::from([task(1), task(2), task(3)]));
    assert_eq!(store.done_tasks(&second.id).await.unwrap(), BTreeSet::from([task(1)]));
    let run = store.get_run(&first.id).await.unwrap().unwrap();
    assert_eq!((run.tasks_done, run.intervals_done, run.retries), (3, 3, 2));
    let run = store.get_run(&second.id).await.unwrap().unwrap();
    assert_eq!((run.tasks_done, run.intervals_done, run.retries), (1, 1, 0));
    assert_eq!(store.get_intervals(std::slice::from_ref(&key)).await.unwrap()[&key].ranges(), &[interval(0, 3)]);
    store.finish_tasks(&[]).await.unwrap();

    // A batch naming a run that does not exist records nothing at all.
    let batch =
        [finished(&first, 4, Some(3), 0), FinishedTask { run_id: run_id("nope"), ..finished(&first, 5, Some(4), 0) }];
    assert!(matches!(store.finish_tasks(&batch).await, Err(StateError::NotFound { .. })));
    assert_eq!(store.done_tasks(&first.id).await.unwrap().len(), 3);
    assert_eq!(store.get_intervals(std::slice::from_ref(&key)).await.unwrap()[&key].ranges(), &[interval(0, 3)]);
}

async fn breaker_trip_and_reset(backend: Backend) {
    let store = &*backend.store;
    let (first, second) = (plan_id("pa"), plan_id("pb"));
    assert_eq!(store.breaker(&first).await.unwrap(), None);
    store.trip_breaker(&first, "aborted by alice").await.unwrap();
    store.trip_breaker(&first, "too many failures").await.unwrap();
    assert_eq!(store.breaker(&first).await.unwrap().as_deref(), Some("aborted by alice"));
    assert_eq!(store.breaker(&second).await.unwrap(), None);
    store.reset_breaker(&first).await.unwrap();
    store.reset_breaker(&first).await.unwrap();
    assert_eq!(store.breaker(&first).await.unwrap(), None);
    store.trip_breaker(&first, "again").await.unwrap();
    assert_eq!(store.breaker(&first).await.unwrap().as_deref(), Some("again"));
}

async fn audit_log_is_newest_first(backend: Backend) {
    let store = &*backend.store;
    assert!(store.list_audit(10).await.unwrap().is_empty());
    let entry = |n: u64, outcome: &str| AuditEntry {
        plan_id: plan_id(&format!("p{n}")),
        run_id: run_id(&format!("p{n}-1")),
        environment: env("prod"),
        user: "alice".to_string(),
        started_at: Timestamp(1_000),
        finished_at: Timestamp(1_000),
        intervals: n * 10,
        models: n,
        retries: 0,
        outcome: outcome.to_string(),
    };
    let entries = [entry(1, "succeeded"), entry(2, "failed: boom"), entry(3, "aborted")];
    for entry in &entries {
        store.append_audit(entry).await.unwrap();
    }
    let listed = store.list_audit(10).await.unwrap();
    assert_eq!(listed, vec![entries[2].clone(), entries[1].clone(), entries[0].clone()]);
    assert_eq!(store.list_audit(2).await.unwrap(), vec![entries[2].clone(), entries[1].clone()]);
}

async fn finalize_run_records_outcome_releases_lease_and_audits(backend: Backend) {
    let store = &*backend.store;
    let applied = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let run = begin(store, &applied, "pa-1", 1_000).await.unwrap();
    store.add_run_progress(&run.id, RunProgress { tasks_done: 1, intervals_done: 24, retries: 0 }).await.unwrap();
    let failed = outcome(RunStatus::Failed, Some("sushi.orders: boom"), 1_100);
    let audit = audit_of(&run, &failed, "failed: sushi.orders: boom");

    let finished = finalize(store, &run.id, &failed, None, &audit).await.unwrap();
    assert_eq!(finished.status, RunStatus::Failed);
    assert_eq!(finished.error.as_deref(), Some("sushi.orders: boom"));
    assert_eq!(finished.finished_at, Some(Timestamp(1_100)));
    assert_eq!((finished.tasks_done, finished.intervals_done), (1, 24), "counters are kept");
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(finished));
    assert_eq!(store.get_lease(&env("dev")).await.unwrap(), None, "the run's lease is released");
    assert_eq!(store.list_audit(10).await.unwrap(), vec![audit]);
    assert!(store.running_runs().await.unwrap().is_empty());
    // Nothing else changed: no environment was promoted.
    assert_eq!(store.get_environment(&env("dev")).await.unwrap(), None);

    // A running run that does not hold its environment's lease leaves the lease alone.
    let other = plan("pb", "qa", None, 2, &[snapshot("sushi.orders", "aaaa")]);
    let other_run = begin(store, &other, "pb-1", 1_200).await.unwrap();
    store.release_lease(&env("qa"), &other_run.id).await.unwrap();
    let third = plan("pc", "dev", None, 3, &[snapshot("sushi.orders", "aaaa")]);
    let third_run = begin(store, &third, "pc-1", 1_210).await.unwrap();
    let succeeded = outcome(RunStatus::Succeeded, None, 1_300);
    let audit = audit_of(&other_run, &succeeded, "succeeded");
    assert_eq!(finalize(store, &other_run.id, &succeeded, None, &audit).await.unwrap().status, RunStatus::Succeeded);
    assert_eq!(store.get_lease(&env("dev")).await.unwrap().unwrap().run_id, third_run.id);
}

async fn finalize_run_twice_keeps_the_first_outcome(backend: Backend) {
    let store = &*backend.store;
    let first_state = state("dev", Some("p0"), &[snapshot("sushi.orders", "aaaa")]);
    promote(store, &first_state, None, 10).await.unwrap();
    let applied = plan("p1", "dev", Some("p0"), 20, &[snapshot("sushi.orders", "bbbb")]);
    let run = begin(store, &applied, "p1-1", 1_000).await.unwrap();
    let aborted = outcome(RunStatus::Aborted, Some("aborted by alice"), 1_100);
    let audit = audit_of(&run, &aborted, "aborted");
    let first = finalize(store, &run.id, &aborted, None, &audit).await.unwrap();
    assert_eq!(first.status, RunStatus::Aborted);

    // Again with the same outcome, then with another status and a promotion: nothing changes,
    // and the first outcome is returned.
    let again = finalize(store, &run.id, &aborted, None, &audit).await.unwrap();
    assert_eq!(again, first);
    let new_state = state("dev", Some("p1"), &[snapshot("sushi.orders", "bbbb")]);
    let succeeded = outcome(RunStatus::Succeeded, None, 1_200);
    let promotion = EnvironmentPromotion {
        state: &new_state,
        expected_plan: Some(&plan_id("p0")),
        expires_at: None,
        now: Timestamp(1_200),
    };
    let other_audit = audit_of(&run, &succeeded, "succeeded");
    let other = finalize(store, &run.id, &succeeded, Some(promotion), &other_audit).await.unwrap();
    assert_eq!(other, first);
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(first));
    assert_eq!(store.list_audit(10).await.unwrap(), vec![audit], "one audit row");
    let record = store.get_environment(&env("dev")).await.unwrap().unwrap();
    assert_eq!(record.state, first_state, "the environment was not promoted");
    assert_eq!(record.updated_at, Timestamp(10));
}

async fn a_promoting_run_ends_only_promoted(backend: Backend) {
    let store = &*backend.store;
    let old_state = state("dev", Some("p0"), &[snapshot("sushi.orders", "aaaa")]);
    promote(store, &old_state, None, 10).await.unwrap();
    let applied = plan("p1", "dev", Some("p0"), 20, &[snapshot("sushi.orders", "bbbb")]);
    let run = begin(store, &applied, "p1-1", 1_000).await.unwrap();
    assert!(!run.promoting);

    // The intent is recorded once, and again (idempotent); the record shows it.
    assert!(store.begin_promotion(&run.id, &applied.id).await.unwrap());
    assert!(store.begin_promotion(&run.id, &applied.id).await.unwrap());
    let promoting = store.get_run(&run.id).await.unwrap().unwrap();
    assert!(promoting.promoting && promoting.status == RunStatus::Running, "{promoting:?}");

    // An abort now is too late: the breaker trips, but neither an aborted nor a failed outcome
    // ends the run, and a resume does not supersede it.
    store.trip_breaker(&applied.id, "aborted by alice").await.unwrap();
    assert!(store.begin_promotion(&run.id, &applied.id).await.unwrap(), "the intent holds past the breaker");
    for status in [RunStatus::Aborted, RunStatus::Failed] {
        let ended = outcome(status, Some("too late"), 1_100);
        let refused = finalize(store, &run.id, &ended, None, &audit_of(&run, &ended, "aborted")).await.unwrap();
        assert_eq!(refused, promoting, "{status:?} does not end a promoting run");
    }
    let resumed = begin(store, &applied, "p1-2", 1_150).await;
    assert!(matches!(resumed, Err(StateError::RunPromoting { ref run, .. }) if run.0 == "p1-1"), "{resumed:?}");
    assert_eq!(store.get_run(&run.id).await.unwrap().as_ref(), Some(&promoting));
    assert!(store.list_audit(10).await.unwrap().is_empty(), "no audit row yet");

    // Promoted, it ends.
    let new_state = state("dev", Some("p1"), &[snapshot("sushi.orders", "bbbb")]);
    let succeeded = outcome(RunStatus::Succeeded, None, 1_200);
    let promotion = EnvironmentPromotion {
        state: &new_state,
        expected_plan: Some(&plan_id("p0")),
        expires_at: None,
        now: Timestamp(1_200),
    };
    let done =
        finalize(store, &run.id, &succeeded, Some(promotion), &audit_of(&run, &succeeded, "promoted")).await.unwrap();
    assert_eq!(done.status, RunStatus::Succeeded);
    assert!(!store.begin_promotion(&run.id, &applied.id).await.unwrap(), "an ended run does not promote again");

    // A run aborted first never begins its promotion.
    let later = plan("p2", "dev", Some("p1"), 30, &[snapshot("sushi.orders", "cccc")]);
    let second = begin(store, &later, "p2-1", 1_300).await.unwrap();
    store.trip_breaker(&later.id, "aborted by bob").await.unwrap();
    assert!(!store.begin_promotion(&second.id, &later.id).await.unwrap());
    assert!(!store.get_run(&second.id).await.unwrap().unwrap().promoting);
    assert!(!store.begin_promotion(&RunId("nobody-1".to_string()), &later.id).await.unwrap(), "unknown run");
}

async fn finalize_run_promotes_the_environment(backend: Backend) {
    let store = &*backend.store;
    let old_state = state("dev", Some("p0"), &[snapshot("sushi.orders", "aaaa")]);
    promote(store, &old_state, None, 10).await.unwrap();
    let applied = plan("p1", "dev", Some("p0"), 20, &[snapshot("sushi.orders", "bbbb")]);
    let run = begin(store, &applied, "p1-1", 1_000).await.unwrap();
    // The new state shows a snapshot the run did not push: it is inserted.
    let extra = snapshot("sushi.items", "cccc");
    let new_state = state("dev", Some("p1"), &[snapshot("sushi.orders", "bbbb"), extra.clone()]);
    let succeeded = outcome(RunStatus::Succeeded, None, 1_100);
    let promotion = EnvironmentPromotion {
        state: &new_state,
        expected_plan: Some(&plan_id("p0")),
        expires_at: Some(Timestamp(9_000)),
        now: Timestamp(1_100),
    };
    let audit = audit_of(&run, &succeeded, "succeeded");
    let finished = finalize(store, &run.id, &succeeded, Some(promotion), &audit).await.unwrap();
    assert_eq!(finished.status, RunStatus::Succeeded);
    assert_eq!(finished.error, None);

    let record = store.get_environment(&env("dev")).await.unwrap().unwrap();
    assert_eq!(record.state, new_state);
    assert_eq!(record.previous, Some(old_state));
    assert_eq!(record.expires_at, Some(Timestamp(9_000)));
    assert_eq!(record.updated_at, Timestamp(1_100));
    assert_eq!(store.get_snapshots(std::slice::from_ref(&extra.id)).await.unwrap().len(), 1);
    assert_eq!(store.get_lease(&env("dev")).await.unwrap(), None);
    assert_eq!(store.list_audit(10).await.unwrap(), vec![audit]);

    // A promotion that creates the environment.
    let fresh_plan = plan("q1", "fresh", None, 30, &[snapshot("sushi.orders", "bbbb")]);
    let fresh_run = begin(store, &fresh_plan, "q1-1", 1_200).await.unwrap();
    let fresh_state = state("fresh", Some("q1"), &[snapshot("sushi.orders", "bbbb")]);
    let promotion =
        EnvironmentPromotion { state: &fresh_state, expected_plan: None, expires_at: None, now: Timestamp(1_300) };
    let succeeded = outcome(RunStatus::Succeeded, None, 1_300);
    let audit = audit_of(&fresh_run, &succeeded, "succeeded");
    finalize(store, &fresh_run.id, &succeeded, Some(promotion), &audit).await.unwrap();
    let record = store.get_environment(&env("fresh")).await.unwrap().unwrap();
    assert_eq!((record.state, record.previous, record.updated_at), (fresh_state, None, Timestamp(1_300)));
}

async fn finalize_run_accepts_an_environment_already_promoted(backend: Backend) {
    let store = &*backend.store;
    let old_state = state("dev", Some("p0"), &[snapshot("sushi.orders", "aaaa")]);
    promote(store, &old_state, None, 10).await.unwrap();
    let applied = plan("p1", "dev", Some("p0"), 20, &[snapshot("sushi.orders", "bbbb")]);
    let run = begin(store, &applied, "p1-1", 1_000).await.unwrap();
    // An earlier attempt promoted the environment, then crashed before it finished the run.
    let new_state = state("dev", Some("p1"), &[snapshot("sushi.orders", "bbbb")]);
    promote(store, &new_state, Some("p0"), 1_050).await.unwrap();
    let before = store.get_environment(&env("dev")).await.unwrap().unwrap();

    let succeeded = outcome(RunStatus::Succeeded, None, 1_100);
    let promotion = EnvironmentPromotion {
        state: &new_state,
        expected_plan: Some(&plan_id("p0")),
        expires_at: Some(Timestamp(9_000)),
        now: Timestamp(1_100),
    };
    let audit = audit_of(&run, &succeeded, "succeeded");
    let finished = finalize(store, &run.id, &succeeded, Some(promotion), &audit).await.unwrap();
    assert_eq!(finished.status, RunStatus::Succeeded);
    let after = store.get_environment(&env("dev")).await.unwrap().unwrap();
    assert_eq!(after, before, "the environment is left as it is");
    assert_eq!(after.previous, Some(old_state));
    assert_eq!(store.get_lease(&env("dev")).await.unwrap(), None);
    assert_eq!(store.list_audit(10).await.unwrap(), vec![audit]);
}

async fn finalize_run_on_a_stale_environment_writes_nothing(backend: Backend) {
    let store = &*backend.store;
    promote(store, &state("dev", Some("p0"), &[snapshot("sushi.orders", "aaaa")]), None, 10).await.unwrap();
    let applied = plan("p1", "dev", Some("p0"), 20, &[snapshot("sushi.orders", "bbbb")]);
    let run = begin(store, &applied, "p1-1", 1_000).await.unwrap();
    // Someone else moved the environment on.
    let rival = state("dev", Some("p9"), &[snapshot("sushi.orders", "zzzz")]);
    promote(store, &rival, Some("p0"), 1_050).await.unwrap();
    let before = store.get_environment(&env("dev")).await.unwrap().unwrap();

    let fresh = snapshot("sushi.items", "ffff");
    let new_state = state("dev", Some("p1"), &[snapshot("sushi.orders", "bbbb"), fresh.clone()]);
    let succeeded = outcome(RunStatus::Succeeded, None, 1_100);
    let promotion = EnvironmentPromotion {
        state: &new_state,
        expected_plan: Some(&plan_id("p0")),
        expires_at: None,
        now: Timestamp(1_100),
    };
    let audit = audit_of(&run, &succeeded, "succeeded");
    match finalize(store, &run.id, &succeeded, Some(promotion), &audit).await.unwrap_err() {
        StateError::StaleEnvironment { environment, expected, actual } => {
            assert_eq!(environment, env("dev"));
            assert_eq!(expected, Some(plan_id("p0")));
            assert_eq!(actual, Some(plan_id("p9")));
        }
        other => panic!("expected StaleEnvironment, got {other:?}"),
    }
    // Nothing was written: the run still runs and holds its lease, no audit row, no snapshot.
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(run.clone()));
    assert_eq!(store.get_lease(&env("dev")).await.unwrap().unwrap().run_id, run.id);
    assert!(store.list_audit(10).await.unwrap().is_empty());
    assert_eq!(store.get_environment(&env("dev")).await.unwrap().unwrap(), before);
    assert!(store.get_snapshots(std::slice::from_ref(&fresh.id)).await.unwrap().is_empty());

    // The run can still be finalized without a promotion.
    let failed = outcome(RunStatus::Failed, Some("environment moved on"), 1_200);
    let audit = audit_of(&run, &failed, "failed: environment moved on");
    assert_eq!(finalize(store, &run.id, &failed, None, &audit).await.unwrap().status, RunStatus::Failed);
    assert_eq!(store.list_audit(10).await.unwrap(), vec![audit]);
}

async fn finalize_unknown_run_is_not_found(backend: Backend) {
    let store = &*backend.store;
    let applied = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let run = begin(store, &applied, "pa-1", 1_000).await.unwrap();
    let succeeded = outcome(RunStatus::Succeeded, None, 1_100);
    let audit = AuditEntry { run_id: run_id("nope"), ..audit_of(&run, &succeeded, "succeeded") };
    let new_state = state("dev", Some("pa"), &[snapshot("sushi.orders", "aaaa")]);
    let promotion =
        EnvironmentPromotion { state: &new_state, expected_plan: None, expires_at: None, now: Timestamp(1_100) };
    assert!(matches!(
        finalize(store, &run_id("nope"), &succeeded, Some(promotion), &audit).await,
        Err(StateError::NotFound { .. })
    ));
    assert!(matches!(
        finalize(store, &run_id("nope"), &succeeded, None, &audit).await,
        Err(StateError::NotFound { .. })
    ));
    assert!(store.list_audit(10).await.unwrap().is_empty());
    assert_eq!(store.get_environment(&env("dev")).await.unwrap(), None);
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(run));
}

/// Finalizes `run` twice at once (a succeeded and an aborted outcome), promoting the
/// environment to `new_state` when given; both calls must succeed and return the same record.
async fn race_finalize(backend: &Backend, run: &RunRecord, new_state: Option<&EnvironmentState>) -> RunRecord {
    let contenders = [
        (outcome(RunStatus::Succeeded, None, 1_100), "succeeded"),
        (outcome(RunStatus::Aborted, Some("aborted by bob"), 1_101), "aborted"),
    ];
    let barrier = Arc::new(tokio::sync::Barrier::new(contenders.len()));
    let mut attempts = tokio::task::JoinSet::new();
    for (finished, text) in contenders {
        let store = Arc::clone(&backend.store);
        let barrier = Arc::clone(&barrier);
        let run = run.clone();
        let new_state = new_state.cloned();
        attempts.spawn(async move {
            let audit = audit_of(&run, &finished, text);
            let expected = plan_id("p0");
            let promotion = new_state.as_ref().map(|new_state| EnvironmentPromotion {
                state: new_state,
                expected_plan: Some(&expected),
                expires_at: None,
                now: finished.finished_at,
            });
            barrier.wait().await;
            finalize(&*store, &run.id, &finished, promotion, &audit).await
        });
    }
    let mut returned = Vec::new();
    while let Some(joined) = attempts.join_next().await {
        returned.push(joined.unwrap().unwrap());
    }
    // Both see the same outcome: the winner's, as stored.
    assert_eq!(returned[0], returned[1]);
    let stored = backend.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored, returned[0]);
    assert_ne!(stored.status, RunStatus::Running);
    stored
}

async fn concurrent_finalize_runs_write_one_audit_row(backend: Backend) {
    let snapshots = [snapshot("sushi.orders", "aaaa")];
    promote(&*backend.store, &state("prod", Some("p0"), &snapshots), None, 10).await.unwrap();
    let applied = plan("p1", "prod", Some("p0"), 20, &snapshots);
    let run = begin(&*backend.store, &applied, "p1-1", 1_000).await.unwrap();
    let new_state = state("prod", Some("p1"), &snapshots);
    let stored = race_finalize(&backend, &run, Some(&new_state)).await;
    let audit = backend.store.list_audit(10).await.unwrap();
    assert_eq!(audit.len(), 1, "exactly one audit row: {audit:?}");
    assert_eq!((audit[0].run_id.clone(), Some(audit[0].finished_at)), (run.id.clone(), stored.finished_at));
    let record = backend.store.get_environment(&EnvironmentName::prod()).await.unwrap().unwrap();
    assert_eq!(record.state, new_state);
    assert_eq!(record.previous.unwrap().plan_id, Some(plan_id("p0")), "promoted once");
    assert_eq!(backend.store.get_lease(&EnvironmentName::prod()).await.unwrap(), None);

    // Without a promotion, and with no lease left to release, only the run itself settles the
    // race.
    let other = plan("q1", "qa", None, 30, &snapshots);
    let other_run = begin(&*backend.store, &other, "q1-1", 1_000).await.unwrap();
    backend.store.release_lease(&env("qa"), &other_run.id).await.unwrap();
    let stored = race_finalize(&backend, &other_run, None).await;
    let audit = backend.store.list_audit(10).await.unwrap();
    assert_eq!(audit.len(), 2, "exactly one more audit row: {audit:?}");
    assert_eq!((audit[0].run_id.clone(), Some(audit[0].finished_at)), (other_run.id, stored.finished_at));
    assert_eq!(backend.store.get_lease(&env("qa")).await.unwrap(), None);
}

async fn superseding_begin_run_audits_and_resets_the_breaker(backend: Backend) {
    let store = &*backend.store;
    let applied = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let first = begin(store, &applied, "pa-1", 1_000).await.unwrap();
    store.add_run_progress(&first.id, RunProgress { tasks_done: 2, intervals_done: 48, retries: 3 }).await.unwrap();
    store.trip_breaker(&applied.id, "aborted by alice").await.unwrap();

    // A refused begin_run (held lease) leaves the other plan's breaker tripped.
    let other = plan("pb", "dev", None, 2, &[snapshot("sushi.orders", "bbbb")]);
    store.trip_breaker(&other.id, "too many failures").await.unwrap();
    assert!(matches!(begin(store, &other, "pb-1", 1_005).await, Err(StateError::LeaseHeld { .. })));
    assert_eq!(store.breaker(&other.id).await.unwrap().as_deref(), Some("too many failures"));
    assert_eq!(store.breaker(&applied.id).await.unwrap().as_deref(), Some("aborted by alice"));
    assert!(store.list_audit(10).await.unwrap().is_empty());

    // The resume takes over the running run: aborted, audited, and the breaker reset.
    let second = begin(store, &applied, "pa-2", 1_010).await.unwrap();
    let aborted = store.get_run(&first.id).await.unwrap().unwrap();
    assert_eq!(aborted.status, RunStatus::Aborted);
    assert_eq!(aborted.finished_at, Some(Timestamp(1_010)));
    assert!(aborted.error.as_deref().unwrap().contains("pa-2"), "{aborted:?}");
    let expected = AuditEntry {
        plan_id: applied.id.clone(),
        run_id: first.id.clone(),
        environment: env("dev"),
        user: "alice".to_string(),
        started_at: Timestamp(1_000),
        finished_at: Timestamp(1_010),
        intervals: 48,
        models: 0,
        retries: 3,
        outcome: "aborted: superseded by run pa-2".to_string(),
    };
    assert_eq!(store.list_audit(10).await.unwrap(), vec![expected.clone()]);
    assert_eq!(store.breaker(&applied.id).await.unwrap(), None);

    // A begin_run that fails after it would have superseded (the run id exists) writes nothing:
    // no audit row, the breaker stays tripped, the running run keeps running.
    store.trip_breaker(&applied.id, "aborted again").await.unwrap();
    assert!(matches!(begin(store, &applied, "pa-2", 1_020).await, Err(StateError::RunExists { .. })));
    assert_eq!(store.list_audit(10).await.unwrap(), vec![expected]);
    assert_eq!(store.breaker(&applied.id).await.unwrap().as_deref(), Some("aborted again"));
    assert_eq!(store.get_run(&second.id).await.unwrap(), Some(second));
}

/// The outlook of `run` of plan `plan` for `interval` of `key`.
async fn outlook(store: &dyn StateStore, run: &str, plan: &str, key: &IntervalKey, interval: Interval) -> TaskOutlook {
    store.task_outlook(&run_id(run), &plan_id(plan), key, interval).await.unwrap()
}

/// Checks `task_outlook`'s `recorded` against `expected` and against what `get_intervals` says.
async fn assert_recorded(store: &dyn StateStore, key: &IntervalKey, interval: Interval, expected: bool) {
    let recorded = outlook(store, "none-1", "none", key, interval).await.recorded;
    assert_eq!(recorded, expected, "task_outlook of {interval} in {key:?}");
    let sets = store.get_intervals(std::slice::from_ref(key)).await.unwrap();
    let by_get_intervals = sets.get(key).is_some_and(|set| set.covers(interval));
    assert_eq!(by_get_intervals, expected, "get_intervals of {interval} in {key:?}");
}

async fn task_outlook_reads_the_run_status(backend: Backend) {
    let store = &*backend.store;
    let key = (model("sushi.orders"), Version("aaaa".to_string()));
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let nothing = TaskOutlook { run: None, breaker: None, recorded: false };
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await, nothing, "no such run");

    let first = begin(store, &plan, "pa-1", 1_000).await.unwrap();
    let running = outlook(store, "pa-1", "pa", &key, interval(0, 1)).await;
    assert_eq!(running, TaskOutlook { run: Some(RunStatus::Running), ..nothing.clone() });
    assert_eq!(outlook(store, "pa-2", "pa", &key, interval(0, 1)).await.run, None, "another run of the plan");

    store.finish_run(&first.id, outcome(RunStatus::Failed, Some("boom"), 1_100)).await.unwrap();
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await.run, Some(RunStatus::Failed));

    // A resume, finished as aborted (a finalized run reads as its first outcome).
    store.release_lease(&env("dev"), &first.id).await.unwrap();
    let second = begin(store, &plan, "pa-2", 1_200).await.unwrap();
    assert_eq!(outlook(store, "pa-2", "pa", &key, interval(0, 1)).await.run, Some(RunStatus::Running));
    let aborted = outcome(RunStatus::Aborted, Some("aborted by alice"), 1_300);
    finalize(store, &second.id, &aborted, None, &audit_of(&second, &aborted, "aborted")).await.unwrap();
    assert_eq!(outlook(store, "pa-2", "pa", &key, interval(0, 1)).await.run, Some(RunStatus::Aborted));
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await.run, Some(RunStatus::Failed));
}

async fn task_outlook_reads_the_breaker(backend: Backend) {
    let store = &*backend.store;
    let key = (model("sushi.orders"), Version("aaaa".to_string()));
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    begin(store, &plan, "pa-1", 1_000).await.unwrap();
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await.breaker, None);

    store.trip_breaker(&plan.id, "aborted by alice").await.unwrap();
    store.trip_breaker(&plan.id, "too many failures").await.unwrap();
    store.trip_breaker(&plan_id("pb"), "another plan").await.unwrap();
    let tripped = outlook(store, "pa-1", "pa", &key, interval(0, 1)).await;
    assert_eq!(
        tripped,
        TaskOutlook { run: Some(RunStatus::Running), breaker: Some("aborted by alice".to_string()), recorded: false }
    );
    // The breaker is the plan's, whether or not the run exists.
    assert_eq!(outlook(store, "nope", "pb", &key, interval(0, 1)).await.breaker.as_deref(), Some("another plan"));

    store.reset_breaker(&plan.id).await.unwrap();
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await.breaker, None);
    assert_eq!(outlook(store, "pa-1", "pb", &key, interval(0, 1)).await.breaker.as_deref(), Some("another plan"));
    store.trip_breaker(&plan.id, "again").await.unwrap();
    assert_eq!(outlook(store, "pa-1", "pa", &key, interval(0, 1)).await.breaker.as_deref(), Some("again"));
}

async fn task_outlook_reads_recorded_intervals(backend: Backend) {
    let store = &*backend.store;
    let key = (model("sushi.orders"), Version("aaaa".to_string()));
    let other_version = (model("sushi.orders"), Version("bbbb".to_string()));
    let other_model = (model("sushi.items"), Version("aaaa".to_string()));
    let record = |key: &IntervalKey, start: i64, end: i64| IntervalRecord {
        name: key.0.clone(),
        version: key.1.clone(),
        interval: interval(start, end),
    };
    assert_recorded(store, &key, interval(0, 24), false).await;
    store.record_intervals(&[record(&key, 0, 24), record(&other_version, 30, 40)]).await.unwrap();
    store.record_intervals(&[record(&other_model, 40, 50)]).await.unwrap();

    assert_recorded(store, &key, interval(0, 24), true).await; // exactly covering
    assert_recorded(store, &key, interval(3, 4), true).await; // inside
    assert_recorded(store, &key, interval(20, 25), false).await; // partially covering
    assert_recorded(store, &key, interval(24, 25), false).await; // only touching
    assert_recorded(store, &key, interval(30, 31), false).await; // recorded for another version
    assert_recorded(store, &key, interval(40, 41), false).await; // recorded for another model
    assert_recorded(store, &other_version, interval(30, 40), true).await;
    assert_recorded(store, &other_model, interval(0, 1), false).await;
    // An empty interval is covered by any set, as `IntervalSet::covers` says.
    let empty = Interval { start: hour(60), end: hour(60) };
    assert_recorded(store, &(model("sushi.unknown"), Version("v0".to_string())), empty, true).await;

    // Everything in one read.
    let plan = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    begin(store, &plan, "pa-1", 1_000).await.unwrap();
    store.trip_breaker(&plan.id, "aborted by alice").await.unwrap();
    assert_eq!(
        outlook(store, "pa-1", "pa", &key, interval(5, 6)).await,
        TaskOutlook { run: Some(RunStatus::Running), breaker: Some("aborted by alice".to_string()), recorded: true }
    );

    store.remove_intervals(std::slice::from_ref(&key)).await.unwrap();
    assert_recorded(store, &key, interval(0, 24), false).await;
    assert_recorded(store, &key, interval(3, 4), false).await;
    assert_recorded(store, &other_version, interval(30, 40), true).await;
}

async fn task_outlook_merges_adjacent_and_overlapping_rows(backend: Backend) {
    let store = &*backend.store;
    let key = (model("sushi.orders"), Version("aaaa".to_string()));
    // Rows as concurrent writers can leave them: adjacent, overlapping, chained through an
    // overlap, and two with a one-hour gap between them.
    let rows = [
        interval(0, 10),
        interval(10, 20),
        interval(30, 40),
        interval(35, 45),
        interval(50, 56),
        interval(55, 62),
        interval(61, 70),
        interval(80, 85),
        interval(86, 90),
    ];
    backend.inspect.insert_interval_rows(&key, &rows).await;

    assert_recorded(store, &key, interval(5, 15), true).await; // two adjacent rows
    assert_recorded(store, &key, interval(0, 20), true).await;
    assert_recorded(store, &key, interval(32, 44), true).await; // two overlapping rows
    assert_recorded(store, &key, interval(30, 45), true).await;
    assert_recorded(store, &key, interval(51, 69), true).await; // a chain of three
    assert_recorded(store, &key, interval(50, 70), true).await;
    assert_recorded(store, &key, interval(0, 21), false).await; // past the end
    assert_recorded(store, &key, interval(15, 35), false).await; // across a gap
    assert_recorded(store, &key, interval(82, 88), false).await; // across a one-hour gap
    assert_recorded(store, &key, interval(85, 86), false).await; // in the gap, touching both
    assert_recorded(store, &key, interval(86, 90), true).await;

    store.remove_intervals(std::slice::from_ref(&key)).await.unwrap();
    assert_recorded(store, &key, interval(5, 15), false).await;
}

// ---------------------------------------------------------------------------------------------
// The janitor's claim

fn table(name: &str, version: &str) -> IntervalKey {
    (model(name), Version(version.to_string()))
}

fn record_of(key: &IntervalKey, start: i64, end: i64) -> IntervalRecord {
    IntervalRecord { name: key.0.clone(), version: key.1.clone(), interval: interval(start, end) }
}

/// The janitor's claim of `tables`, having read the running runs `running` and the environments
/// `environments` (name, plan id).
async fn claim(
    store: &dyn StateStore,
    tables: &[IntervalKey],
    running: &[&str],
    environments: &[(&str, Option<&str>)],
) -> Result<(), StateError> {
    let running: Vec<RunId> = running.iter().map(|id| run_id(id)).collect();
    let environments: BTreeMap<EnvironmentName, Option<PlanId>> =
        environments.iter().map(|(name, plan)| (env(name), plan.map(plan_id))).collect();
    store.claim_tables_for_drop(tables, &running, &environments).await
}

/// The recorded ranges of `key`.
async fn ranges_of(store: &dyn StateStore, key: &IntervalKey) -> Vec<Interval> {
    store.get_intervals(std::slice::from_ref(key)).await.unwrap()[key].ranges().to_vec()
}

/// Asserts `TableBeingDropped` naming the physical table of `key`.
fn assert_being_dropped(outcome: Result<impl std::fmt::Debug, StateError>, key: &IntervalKey) {
    match outcome {
        Err(error @ StateError::TableBeingDropped { .. }) => {
            let expected = sluice_core::names::PhysicalTable::of(&key.0, &key.1).to_string();
            assert!(matches!(&error, StateError::TableBeingDropped { table } if *table == expected), "{error:?}");
            assert!(error.is_transient(), "{error}");
            assert!(error.to_string().contains(&expected), "{error}");
        }
        other => panic!("expected TableBeingDropped for {key:?}, got {other:?}"),
    }
}

async fn claim_removes_intervals_and_lists_tables_until_released(backend: Backend) {
    let store = &*backend.store;
    let orders = table("sushi.orders", "bbbb");
    let items = table("sushi.items", "aaaa");
    let kept = table("sushi.orders", "aaaa");
    store
        .record_intervals(&[record_of(&orders, 0, 24), record_of(&items, 0, 5), record_of(&kept, 0, 24)])
        .await
        .unwrap();
    assert!(store.tables_being_dropped().await.unwrap().is_empty());

    claim(store, &[orders.clone(), items.clone()], &[], &[]).await.unwrap();
    assert!(ranges_of(store, &orders).await.is_empty());
    assert!(ranges_of(store, &items).await.is_empty());
    assert_eq!(ranges_of(store, &kept).await, vec![interval(0, 24)], "another version is another table");
    // In key order.
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![items.clone(), orders.clone()]);

    store.release_dropped_tables(std::slice::from_ref(&orders)).await.unwrap();
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![items.clone()]);
    // Releasing again, or a table never claimed, or nothing, is fine.
    store.release_dropped_tables(&[orders.clone(), kept.clone()]).await.unwrap();
    store.release_dropped_tables(&[]).await.unwrap();
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![items.clone()]);

    // A released table can be recorded again (a plan rebuilds it); a claimed one cannot.
    store.record_intervals(&[record_of(&orders, 0, 1)]).await.unwrap();
    assert_eq!(ranges_of(store, &orders).await, vec![interval(0, 1)]);
    assert_being_dropped(store.record_intervals(&[record_of(&items, 0, 1)]).await, &items);
    store.release_dropped_tables(std::slice::from_ref(&items)).await.unwrap();
    assert!(store.tables_being_dropped().await.unwrap().is_empty());
    store.record_intervals(&[record_of(&items, 0, 1)]).await.unwrap();
    assert_eq!(ranges_of(store, &items).await, vec![interval(0, 1)]);
}

async fn claim_is_idempotent(backend: Backend) {
    let store = &*backend.store;
    let orders = table("sushi.orders", "aaaa");
    let items = table("sushi.items", "aaaa");
    store.record_intervals(&[record_of(&orders, 0, 24)]).await.unwrap();
    claim(store, std::slice::from_ref(&orders), &[], &[]).await.unwrap();
    // Again (a janitor retrying after a lost reply), with a table listed twice, and with a new one.
    claim(store, &[orders.clone(), orders.clone()], &[], &[]).await.unwrap();
    claim(store, &[orders.clone(), items.clone()], &[], &[]).await.unwrap();
    claim(store, &[], &[], &[]).await.unwrap();
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![items.clone(), orders.clone()]);
    assert!(ranges_of(store, &orders).await.is_empty());
    store.release_dropped_tables(&[orders.clone(), items.clone()]).await.unwrap();
    assert!(store.tables_being_dropped().await.unwrap().is_empty());
}

async fn begin_run_of_a_plan_using_a_claimed_table_writes_nothing(backend: Backend) {
    let store = &*backend.store;
    // The simulation's case: a failed plan whose new tables nobody references while it is not
    // running, resumed while the janitor drops them.
    let orders = snapshot("sushi.orders", "aaaa");
    let items = snapshot("sushi.items", "bbbb");
    let failed_plan = plan("pa", "dev", None, 1, &[orders.clone(), items.clone()]);
    let first = begin(store, &failed_plan, "pa-1", 1_000).await.unwrap();
    let items_table = table("sushi.items", "bbbb");
    store.record_intervals(&[record_of(&items_table, 0, 3)]).await.unwrap();
    let failed = outcome(RunStatus::Failed, Some("boom"), 1_100);
    let audit = audit_of(&first, &failed, "failed: boom");
    finalize(store, &first.id, &failed, None, &audit).await.unwrap();
    store.trip_breaker(&failed_plan.id, "too many failures").await.unwrap();

    claim(store, std::slice::from_ref(&items_table), &[], &[]).await.unwrap();
    assert_being_dropped(begin(store, &failed_plan, "pa-2", 1_200).await, &items_table);
    // Nothing of the resume was written: no run, no lease, the breaker still tripped.
    assert_eq!(store.get_run(&run_id("pa-2")).await.unwrap(), None);
    assert_eq!(backend.inspect.run_rows().await, 1);
    assert_eq!(store.get_lease(&env("dev")).await.unwrap(), None);
    assert_eq!(store.breaker(&failed_plan.id).await.unwrap().as_deref(), Some("too many failures"));
    assert_eq!(store.list_audit(10).await.unwrap().len(), 1);
    assert!(ranges_of(store, &items_table).await.is_empty());

    // A new plan using the table writes no plan and no snapshot either, nor takes over a lease.
    let fresh = snapshot("sushi.customers", "cccc");
    let other = plan("pb", "qa", None, 2, &[fresh.clone(), items.clone()]);
    let holder = plan("pc", "qa", None, 3, std::slice::from_ref(&fresh));
    begin(store, &holder, "pc-1", 1_000).await.unwrap();
    assert_being_dropped(begin(store, &other, "pb-1", 1_300).await, &items_table);
    assert_eq!(store.get_plan(&other.id).await.unwrap(), None);
    assert!(store.runs_of_plan(&other.id).await.unwrap().is_empty());
    let lease = store.get_lease(&env("qa")).await.unwrap().unwrap();
    assert_eq!(lease.run_id, run_id("pc-1"), "the expired lease was not taken over");
    assert_eq!(store.get_run(&run_id("pc-1")).await.unwrap().unwrap().status, RunStatus::Running);
    let mut doomed_snapshot = snapshot("sushi.items", "bbbb");
    doomed_snapshot.id = SnapshotId("sushi.items@only-in-pd".to_string());
    let only_here = plan("pd", "staging", None, 4, &[doomed_snapshot.clone()]);
    assert_being_dropped(begin(store, &only_here, "pd-1", 1_300).await, &items_table);
    assert!(store.get_snapshots(std::slice::from_ref(&doomed_snapshot.id)).await.unwrap().is_empty());

    // Once the janitor is done, the resume goes ahead.
    store.release_dropped_tables(std::slice::from_ref(&items_table)).await.unwrap();
    let resumed = begin(store, &failed_plan, "pa-2", 1_400).await.unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    assert_eq!(store.breaker(&failed_plan.id).await.unwrap(), None);
}

async fn intervals_of_a_claimed_table_are_not_recorded(backend: Backend) {
    let store = &*backend.store;
    let running = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let run = begin(store, &running, "pa-1", 1_000).await.unwrap();
    let kept = table("sushi.orders", "aaaa");
    let doomed = table("sushi.items", "zzzz");
    claim(store, std::slice::from_ref(&doomed), &["pa-1"], &[]).await.unwrap();

    let finished = |n: u8, key: &IntervalKey, hour: i64| FinishedTask {
        run_id: run.id.clone(),
        task_id: task(n),
        interval: Some(record_of(key, hour, hour + 1)),
        intervals: 1,
        retries: 0,
    };
    // One interval of the batch is for the claimed table: the whole batch records nothing.
    assert_being_dropped(store.finish_tasks(&[finished(1, &kept, 0), finished(2, &doomed, 0)]).await, &doomed);
    assert!(store.done_tasks(&run.id).await.unwrap().is_empty());
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.tasks_done, stored.intervals_done), (0, 0));
    assert!(ranges_of(store, &kept).await.is_empty());
    assert!(ranges_of(store, &doomed).await.is_empty());
    // The same for `record_intervals`.
    assert_being_dropped(store.record_intervals(&[record_of(&kept, 0, 1), record_of(&doomed, 0, 1)]).await, &doomed);
    assert!(ranges_of(store, &kept).await.is_empty());
    assert!(ranges_of(store, &doomed).await.is_empty());

    // Tasks that record no interval, or only intervals of other tables, go through.
    let no_interval = FinishedTask { interval: None, ..finished(3, &doomed, 0) };
    store.finish_tasks(&[finished(1, &kept, 0), no_interval]).await.unwrap();
    assert_eq!(store.done_tasks(&run.id).await.unwrap(), BTreeSet::from([task(1), task(3)]));
    assert_eq!(ranges_of(store, &kept).await, vec![interval(0, 1)]);

    store.release_dropped_tables(std::slice::from_ref(&doomed)).await.unwrap();
    store.finish_tasks(&[finished(2, &doomed, 0)]).await.unwrap();
    assert_eq!(ranges_of(store, &doomed).await, vec![interval(0, 1)]);
}

async fn claim_after_a_run_began_or_ended_changes_nothing(backend: Backend) {
    let store = &*backend.store;
    let doomed = table("sushi.items", "zzzz");
    store.record_intervals(&[record_of(&doomed, 0, 24)]).await.unwrap();
    let assert_nothing_claimed = || async {
        assert!(store.tables_being_dropped().await.unwrap().is_empty());
        assert_eq!(ranges_of(store, &doomed).await, vec![interval(0, 24)]);
    };

    // The janitor read no running run; then a run began.
    let first = plan("pa", "dev", None, 1, &[snapshot("sushi.items", "zzzz")]);
    begin(store, &first, "pa-1", 1_000).await.unwrap();
    let error = claim(store, std::slice::from_ref(&doomed), &[], &[]).await.unwrap_err();
    assert!(matches!(error, StateError::Contention { .. }), "{error:?}");
    assert!(error.is_transient());
    assert_nothing_claimed().await;

    // The janitor read pa-1 running; then it was superseded by a resume (one ended, one began).
    begin(store, &first, "pa-2", 1_010).await.unwrap();
    let error = claim(store, std::slice::from_ref(&doomed), &["pa-1"], &[]).await.unwrap_err();
    assert!(matches!(error, StateError::Contention { .. }), "{error:?}");
    assert_nothing_claimed().await;

    // The janitor read pa-2 running; then it ended: still not the set it read.
    store.finish_run(&run_id("pa-2"), outcome(RunStatus::Failed, Some("boom"), 1_100)).await.unwrap();
    let error = claim(store, std::slice::from_ref(&doomed), &["pa-2"], &[]).await.unwrap_err();
    assert!(matches!(error, StateError::Contention { .. }), "{error:?}");
    // A run read that never existed is a difference too.
    let error = claim(store, std::slice::from_ref(&doomed), &["ghost-1"], &[]).await.unwrap_err();
    assert!(matches!(error, StateError::Contention { .. }), "{error:?}");
    assert_nothing_claimed().await;

    // Read again: the same set (in any order, repeated) is accepted.
    let second = plan("pb", "qa", None, 2, &[snapshot("sushi.orders", "aaaa")]);
    let third = plan("pc", "staging", None, 3, &[snapshot("sushi.orders", "aaaa")]);
    begin(store, &second, "pb-1", 1_200).await.unwrap();
    begin(store, &third, "pc-1", 1_200).await.unwrap();
    claim(store, std::slice::from_ref(&doomed), &["pc-1", "pb-1", "pc-1"], &[]).await.unwrap();
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![doomed.clone()]);
    assert!(ranges_of(store, &doomed).await.is_empty());
}

async fn claim_on_a_stale_environment_map_changes_nothing(backend: Backend) {
    let store = &*backend.store;
    let doomed = table("sushi.items", "zzzz");
    store.record_intervals(&[record_of(&doomed, 0, 24)]).await.unwrap();
    promote(store, &state("dev", Some("p1"), &[snapshot("sushi.orders", "aaaa")]), None, 10).await.unwrap();
    promote(store, &state("empty", None, &[]), None, 10).await.unwrap();

    let stale_maps: [&[(&str, Option<&str>)]; 4] = [
        // The janitor read no environment; then dev and empty were created.
        &[],
        // It read dev at another plan, or without a plan.
        &[("dev", Some("p0")), ("empty", None)],
        &[("dev", None), ("empty", None)],
        // It missed one environment.
        &[("dev", Some("p1"))],
    ];
    for environments in stale_maps {
        let error = claim(store, std::slice::from_ref(&doomed), &[], environments).await.unwrap_err();
        assert!(matches!(error, StateError::Contention { .. }), "{environments:?}: {error:?}");
        assert!(error.is_transient());
        assert!(store.tables_being_dropped().await.unwrap().is_empty());
        assert_eq!(ranges_of(store, &doomed).await, vec![interval(0, 24)]);
    }

    // The map as it is; an environment deleted since the read only dropped references.
    claim(store, std::slice::from_ref(&doomed), &[], &[("dev", Some("p1")), ("empty", None), ("gone", Some("p7"))])
        .await
        .unwrap();
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![doomed.clone()]);
    assert!(ranges_of(store, &doomed).await.is_empty());

    // A promotion after the janitor's read makes its map stale.
    promote(store, &state("dev", Some("p2"), &[snapshot("sushi.orders", "bbbb")]), Some("p1"), 20).await.unwrap();
    let other = table("sushi.orders", "cccc");
    let error = claim(store, std::slice::from_ref(&other), &[], &[("dev", Some("p1")), ("empty", None)]).await;
    assert!(matches!(error, Err(StateError::Contention { .. })), "{error:?}");
    assert_eq!(store.tables_being_dropped().await.unwrap(), vec![doomed]);
}

async fn concurrent_claims_and_begin_runs_exclude_each_other(backend: Backend) {
    // Each round, the janitor reads the running runs and claims a table, while a plan using that
    // table begins: exactly one of the two may succeed (both would be the bug: a run writing
    // into a table being dropped; neither would be a refusal without a cause).
    for round in 0..12_i64 {
        let version = format!("v{round}");
        let doomed = table("sushi.items", &version);
        let running: Vec<String> =
            backend.store.running_runs().await.unwrap().into_iter().map(|run| run.id.0).collect();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let begun = {
            let store = Arc::clone(&backend.store);
            let barrier = Arc::clone(&barrier);
            let plan =
                plan(&format!("p{round}"), &format!("env{round}"), None, round, &[snapshot("sushi.items", &version)]);
            tokio::spawn(async move {
                barrier.wait().await;
                begin(&*store, &plan, &format!("p{round}-1"), 1_000).await
            })
        };
        let claimed = {
            let store = Arc::clone(&backend.store);
            let barrier = Arc::clone(&barrier);
            let doomed = doomed.clone();
            tokio::spawn(async move {
                let running: Vec<&str> = running.iter().map(String::as_str).collect();
                barrier.wait().await;
                claim(&*store, std::slice::from_ref(&doomed), &running, &[]).await
            })
        };
        let begun = begun.await.unwrap();
        let claimed = claimed.await.unwrap();
        match (&begun, &claimed) {
            (Ok(_), Err(StateError::Contention { .. })) => {
                assert!(backend.store.tables_being_dropped().await.unwrap().iter().all(|key| key != &doomed));
            }
            (Err(StateError::TableBeingDropped { .. }), Ok(())) => {
                assert_eq!(backend.store.get_run(&run_id(&format!("p{round}-1"))).await.unwrap(), None);
            }
            other => panic!("round {round}: expected exactly one of begin_run and the claim to win, got {other:?}"),
        }
    }
}

async fn concurrent_claims_and_interval_writes_leave_no_interval(backend: Backend) {
    // A running run's worker records intervals of a table while the janitor claims it: the
    // write either fails, or lands before the claim and is removed by it. Either way no
    // interval of a claimed table is left.
    let running = plan("pa", "dev", None, 1, &[snapshot("sushi.orders", "aaaa")]);
    let run = begin(&*backend.store, &running, "pa-1", 1_000).await.unwrap();
    for round in 0..12_u8 {
        let doomed = table("sushi.items", &format!("v{round}"));
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let finished = {
            let store = Arc::clone(&backend.store);
            let barrier = Arc::clone(&barrier);
            let task = FinishedTask {
                run_id: run.id.clone(),
                task_id: task(round),
                interval: Some(record_of(&doomed, 0, 1)),
                intervals: 1,
                retries: 0,
            };
            tokio::spawn(async move {
                barrier.wait().await;
                store.finish_tasks(std::slice::from_ref(&task)).await
            })
        };
        let recorded = {
            let store = Arc::clone(&backend.store);
            let barrier = Arc::clone(&barrier);
            let record = record_of(&doomed, 5, 6);
            tokio::spawn(async move {
                barrier.wait().await;
                store.record_intervals(std::slice::from_ref(&record)).await
            })
        };
        barrier.wait().await;
        claim(&*backend.store, std::slice::from_ref(&doomed), &["pa-1"], &[]).await.unwrap();
        for outcome in [finished.await.unwrap(), recorded.await.unwrap()] {
            match outcome {
                Ok(()) | Err(StateError::TableBeingDropped { .. }) => {}
                Err(other) => panic!("round {round}: expected success or TableBeingDropped, got {other:?}"),
            }
        }
        assert!(
            ranges_of(&*backend.store, &doomed).await.is_empty(),
            "round {round}: an interval of {doomed:?} is left"
        );
    }
}
