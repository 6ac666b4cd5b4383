-- Completes one task of a run in the dependency gate, atomically and idempotently.
--
-- KEYS[1] <prefix>:run:{<run>}:outstanding  integer: tasks of the run neither done nor skipped
-- KEYS[2] <prefix>:run:{<run>}:parents      string of big-endian u32, one per task (BITFIELD
--                                            u32 #i): unfinished parents; its length / 4 is
--                                            how many tasks the run has
-- KEYS[3] <prefix>:run:{<run>}:done         bitmap: bit i set once task i is done or skipped
-- ARGV[1] the task's index; ARGV[2..] the indexes of its children in the task graph
--
-- If the task is not done yet: mark it done, decrement each child's count once (never below 0)
-- and the outstanding count once. Either way, report the given children that have no unfinished
-- parent and are not done, so a retried call re-reports them and decrements nothing. Children
-- outside the run are ignored.
--
-- Returns {1, newly_done, run_complete, ready child...}; {0} when the run is unknown (a key is
-- missing: never loaded, cleared, expired, evicted or lost); {-1} when the task is not in the run.

if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) < 3 then
  return {0}
end
local task_count = math.floor(redis.call('STRLEN', KEYS[2]) / 4)
local task = tonumber(ARGV[1])
if task >= task_count then
  return {-1}
end

local newly_done = 0
local outstanding
if redis.call('SETBIT', KEYS[3], task, 1) == 0 then
  newly_done = 1
  outstanding = redis.call('DECR', KEYS[1])
  for i = 2, #ARGV do
    if tonumber(ARGV[i]) < task_count then
      redis.call('BITFIELD', KEYS[2], 'OVERFLOW', 'SAT', 'INCRBY', 'u32', '#' .. ARGV[i], -1)
    end
  end
else
  outstanding = tonumber(redis.call('GET', KEYS[1]))
end

local result = {1, newly_done, 0}
if outstanding == 0 then
  result[3] = 1
end
for i = 2, #ARGV do
  local child = tonumber(ARGV[i])
  if child < task_count
    and redis.call('BITFIELD', KEYS[2], 'GET', 'u32', '#' .. ARGV[i])[1] == 0
    and redis.call('GETBIT', KEYS[3], child) == 0 then
    result[#result + 1] = child
  end
end
return result
