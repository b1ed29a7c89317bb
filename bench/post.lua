-- wrk script for bench/run.sh: POSTs one fixed body with the relay headers and writes a
-- one-line JSON summary to $BENCH_OUT when the run ends.
--
-- Environment:
--   BENCH_BODY_FILE       file whose bytes are the request body (required)
--   BENCH_OUT             where done() writes the JSON summary (required)
--   BENCH_OUTBOUND_TOKEN  value of x-mte-outbound-token (sent when set)
--   BENCH_PEER            value of x-mte-upstream, the relay B origin (sent when set)
--   BENCH_DELAY_MS        pause per connection between a response and its next request, in
--                         milliseconds; 0 (default) sends back to back

local function required_env(name)
  local value = os.getenv(name)
  if value == nil or value == "" then
    error("post.lua: environment variable " .. name .. " is missing")
  end
  return value
end

local body_file = assert(io.open(required_env("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers["Content-Type"] = "application/json"

local token = os.getenv("BENCH_OUTBOUND_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["x-mte-outbound-token"] = token
end

local peer = os.getenv("BENCH_PEER")
if peer ~= nil and peer ~= "" then
  wrk.headers["x-mte-upstream"] = peer
end

-- wrk starts a request's latency clock when it writes the request, so the pause is not
-- counted as latency.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

-- summary.errors.status counts responses with a status of 400 or above (wrk 4.1).
function done(summary, latency, requests)
  local out = assert(io.open(required_env("BENCH_OUT"), "w"))
  local errors = summary.errors
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
  out:close()
end
