-- POST /collection/estimate: price three categories against the organisation's budget.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
wrk.method = "POST"
wrk.path = "/collection/estimate"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"category_ids": ["electronics", "home-garden", "toys"]}'
