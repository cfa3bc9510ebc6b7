-- GET /collection/runs/{id}: one run of the caller's organisation.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
wrk.method = "GET"
wrk.path = "/collection/runs/" .. os.getenv("BENCH_RUN_ID")
