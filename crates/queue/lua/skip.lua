-- Settles tasks of a run without success (a failed task and its descendants), atomically and
-- idempotently: each task not done yet is marked done and decrements the outstanding count
-- once; no child is decremented or released.
--
-- KEYS[1] <prefix>:run:{<run>}:outstanding, KEYS[2] ...:parents, KEYS[3] ...:done (see complete.lua)
-- ARGV    the indexes of the tasks to settle; indexes outside the run are ignored
--
-- Returns 1 when nothing of the run is outstanding any more, 0 when something is, and -1 when
-- the run is unknown (a key is missing).

if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) < 3 then
  return -1
end
local task_count = math.floor(redis.call('STRLEN', KEYS[2]) / 4)
local settled = 0
for i = 1, #ARGV do
  local task = tonumber(ARGV[i])
  if task < task_count and redis.call('SETBIT', KEYS[3], task, 1) == 0 then
    settled = settled + 1
  end
end
local outstanding
if settled > 0 then
  outstanding = redis.call('DECRBY', KEYS[1], settled)
else
  outstanding = tonumber(redis.call('GET', KEYS[1]))
end
if outstanding == 0 then
  return 1
end
return 0
