-- The promotion's intent: set by the promoter before the first gateway's views move; from then
-- on the run can only end promoted (see RunStore::begin_promotion).
ALTER TABLE sluice_runs ADD COLUMN promoting INTEGER NOT NULL DEFAULT 0 CHECK (promoting IN (0, 1));
