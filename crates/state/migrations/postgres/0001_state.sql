-- sluice state, PostgreSQL (distributed mode, the only truth). Times are epoch seconds UTC;
-- snapshots and plans are serde_json text next to the key columns they are found by.

CREATE TABLE sluice_snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX sluice_snapshots_name_version ON sluice_snapshots (name, version);

CREATE TABLE sluice_plans (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT PRIMARY KEY,
    environment TEXT NOT NULL,
    previous_plan_id TEXT,
    created_at BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX sluice_plans_environment ON sluice_plans (environment, created_at, seq);

-- What each environment shows (plan_id) and what a rollback returns to (previous_*).
CREATE TABLE sluice_environments (
    name TEXT PRIMARY KEY,
    plan_id TEXT,
    has_previous BOOLEAN NOT NULL,
    previous_plan_id TEXT,
    expires_at BIGINT,
    updated_at BIGINT NOT NULL
);

-- The snapshots of an environment's current and previous state, in order.
CREATE TABLE sluice_environment_snapshots (
    environment TEXT NOT NULL REFERENCES sluice_environments (name) ON DELETE CASCADE,
    generation TEXT NOT NULL CHECK (generation IN ('current', 'previous')),
    position INTEGER NOT NULL,
    snapshot_id TEXT NOT NULL REFERENCES sluice_snapshots (id),
    PRIMARY KEY (environment, generation, position)
);
CREATE INDEX sluice_environment_snapshots_snapshot ON sluice_environment_snapshots (snapshot_id);

-- One row per environment being applied: the run holding it and until when.
CREATE TABLE sluice_leases (
    environment TEXT PRIMARY KEY,
    plan_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);

CREATE TABLE sluice_runs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    id TEXT PRIMARY KEY,
    plan_id TEXT NOT NULL REFERENCES sluice_plans (id),
    environment TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'aborted')),
    started_at BIGINT NOT NULL,
    finished_at BIGINT,
    intervals_done BIGINT NOT NULL DEFAULT 0,
    tasks_done BIGINT NOT NULL DEFAULT 0,
    retries BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    user_name TEXT NOT NULL
);
CREATE INDEX sluice_runs_plan ON sluice_runs (plan_id, seq);
CREATE INDEX sluice_runs_environment_running ON sluice_runs (environment) WHERE status = 'running';

CREATE TABLE sluice_tasks_done (
    run_id TEXT NOT NULL REFERENCES sluice_runs (id) ON DELETE CASCADE,
    plan_id TEXT NOT NULL,
    task_id BYTEA NOT NULL,
    PRIMARY KEY (run_id, task_id)
);
CREATE INDEX sluice_tasks_done_plan ON sluice_tasks_done (plan_id, task_id);

CREATE TABLE sluice_task_failures (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES sluice_runs (id) ON DELETE CASCADE,
    task_id BYTEA NOT NULL,
    model TEXT NOT NULL,
    interval_start BIGINT NOT NULL,
    interval_end BIGINT NOT NULL,
    error TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    UNIQUE (run_id, task_id)
);

CREATE TABLE sluice_breakers (
    plan_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL
);

-- Recorded intervals, compacted per (name, version) on write.
CREATE TABLE sluice_intervals (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    start_ts BIGINT NOT NULL,
    end_ts BIGINT NOT NULL,
    CHECK (start_ts < end_ts)
);
CREATE INDEX sluice_intervals_key ON sluice_intervals (name, version, start_ts);

CREATE TABLE sluice_audit_log (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    environment TEXT NOT NULL,
    user_name TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    intervals BIGINT NOT NULL,
    models BIGINT NOT NULL,
    retries BIGINT NOT NULL,
    outcome TEXT NOT NULL
);
