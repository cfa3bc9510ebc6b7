-- POST /collection/runs, then POST /collection/runs/{id}/cancel for each run created, so the
-- organisation never holds more active runs than there are connections. wrk counts both requests:
-- requests/s = 2 x pairs/s, and the latency figures mix creates and cancels.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
wrk.headers["Content-Type"] = "application/json"
local create_body = '{"name": "bench", "category_ids": ["electronics", "home-garden"]}'
local to_cancel = {}

function request()
  local id = table.remove(to_cancel)
  if id then
    return wrk.format("POST", "/collection/runs/" .. id .. "/cancel", nil, nil)
  end
  return wrk.format("POST", "/collection/runs", nil, create_body)
end

function response(status, headers, body)
  if status == 201 then
    local id = string.match(body, '"id":%s*"([%x%-]+)"')
    if id then
      table.insert(to_cancel, id)
    end
  end
end
