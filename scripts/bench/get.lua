-- wrk script: GET PATH with a bearer token (TOKEN).
local token = os.getenv("TOKEN")
local path = os.getenv("GETPATH")
request = function()
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. token })
end
