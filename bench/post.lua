-- wrk script for bench/run: POSTs one JSON body to every request and prints a
-- machine-readable summary at the end.
--
--   BENCH_BODY=FILE           the request body (read once)
--   BENCH_HEADERS="K: V\nK: V" extra request headers, one per line
--   BENCH_COUNT_STATUS=1      count every non-2xx response exactly (a
--                             `response` hook; costs wrk some speed, so only
--                             where the count matters). Without it, wrk's own
--                             status error count (status >= 400) is reported.
--
-- Last line of output: BENCH_JSON {"requests":..,"duration_us":..,"p50_us":..,...}

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local data = f:read("*a")
   f:close()
   return data
end

wrk.method = "POST"
wrk.body = read_file(assert(os.getenv("BENCH_BODY"), "BENCH_BODY is not set"))
wrk.headers["Content-Type"] = "application/json"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
   local k, v = line:match("^%s*([^:]+):%s*(.-)%s*$")
   if k then
      wrk.headers[k] = v
   end
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

if os.getenv("BENCH_COUNT_STATUS") == "1" then
   non2xx = 0
   function response(status, headers, body)
      if status < 200 or status > 299 then
         non2xx = non2xx + 1
      end
   end
end

function done(summary, latency, requests)
   local non2xx = nil
   if os.getenv("BENCH_COUNT_STATUS") == "1" then
      non2xx = 0
      for _, t in ipairs(threads) do
         non2xx = non2xx + (t:get("non2xx") or 0)
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,'
         .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"status_errors":%d,"non2xx":%s}\n',
      summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status,
      non2xx and tostring(non2xx) or "null"))
end
