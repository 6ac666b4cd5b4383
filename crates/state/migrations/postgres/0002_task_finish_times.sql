-- When each task was recorded done: the run's timeline (interval-level pipelining shows in it:
-- a child's first task finishes before its parent's last).
ALTER TABLE sluice_tasks_done ADD COLUMN finished_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp();
