-- The janitor's tombstones: physical tables (name, version) it claimed and is dropping. While a
-- table has one, `begin_run` refuses a plan that uses it and no interval is recorded for it;
-- the janitor deletes the tombstone once the table is gone.
CREATE TABLE sluice_tables_being_dropped (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
