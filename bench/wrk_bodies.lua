-- wrk script for bench/serve.py: POST /predict, cycling through the JSON bodies in BODIES_FILE
-- (one per line); at the end prints one JSON line with throughput inputs and latency percentiles.
local bodies = {}
local i = 0
local threads = 0

function setup(thread)  -- each thread starts at its own body
  thread:set("offset", threads * 97)
  threads = threads + 1
end

function init(args)
  for line in io.lines(os.getenv("BODIES_FILE")) do
    bodies[#bodies + 1] = line
  end
  i = offset % #bodies
end

function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
