-- wrk script of bench/http.py. The method and the body file come from the environment
-- (BENCH_METHOD, BENCH_BODY); the identity headers are those a login proxy would set.
-- done() prints one line of JSON with exact percentiles (µs) and each kind of error counted
-- apart ("status" is wrk's "Non-2xx or 3xx responses"): wrk's own summary rounds them.
wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.headers["X-User"] = "bench"
wrk.headers["X-Roles"] = "clinician"
local body = os.getenv("BENCH_BODY")
if body and body ~= "" then
  local file = assert(io.open(body, "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
