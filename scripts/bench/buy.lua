-- wrk script: one buy per request, buyer i mod #tokens, an optional Idempotency-Key.
-- Environment: TOKENS (file, one bearer token per line), CAMPAIGN, IDEM (1 = send a
-- fresh key per request), BODY (defaults to {"quantity":1}).
local tokens = {}
for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
local path = "/v1/campaigns/" .. os.getenv("CAMPAIGN") .. "/buy"
local idem = os.getenv("IDEM") == "1"
local body = os.getenv("BODY") or '{"quantity":1}'
local n = 0
local run = tostring(math.random(1, 1e9))
wrk.method = "POST"
wrk.body = body
request = function()
  n = n + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(n % #tokens) + 1],
  }
  if idem then headers["Idempotency-Key"] = run .. "-" .. n end
  return wrk.format("POST", path, headers, body)
end
