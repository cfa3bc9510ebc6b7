-- Runs listing, second step (builds on 20261125000500_collection_list_runs_fast.sql, same signatures).
--
-- 20261125000500 asked the planner for an estimate (EXPLAIN) on every page and counted only when the
-- estimate was small: every page paid for the EXPLAIN, so an org with a few hundred runs listed ~15 %
-- slower than before that migration. Now:
-- 1. `total` counts first, exactly, up to 10,000 (an index-only walk of at most 10,001 entries); only
--    above that is the planner's estimate used (`total_estimated: true`, never below 10,001).
-- 2. Offsets under 1,000 read the page's rows straight away; deeper ones still walk the index alone
--    (ids only) and read just the page's rows.
-- 3. collection_count_runs (the estimate-first total) is replaced by collection_runs_total.
-- Measured (benchmarks/README.md), SQL time before 000500 -> after this one: an org of 200 runs, first
-- page ~0.61 -> ~0.52 ms; of 100,000 runs, first page 9-17 -> ~1.4 ms, offset 90,000 22-31 -> ~5.6 ms.

-- The total of a listing: `counted` rows were found with `limit 10,001`; up to 10,000 that is exact,
-- above it the planner's estimate is used (never below what was counted: statistics can lag behind
-- a fast-growing org). Volatile only because EXPLAIN is refused inside stable functions.
create function public.collection_runs_total(p_org_id uuid, p_status text, p_counted bigint)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  plan jsonb;
begin
  if p_counted <= 10000 then
    return jsonb_build_object('total', p_counted, 'total_estimated', false);
  end if;
  if p_status is null then
    execute format('explain (format json) select 1 from public.collection_runs where org_id = %L',
                   p_org_id) into plan;
  else
    execute format('explain (format json) select 1 from public.collection_runs '
                   'where org_id = %L and status = %L', p_org_id, p_status) into plan;
  end if;
  return jsonb_build_object(
    'total', greatest((plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint, p_counted),
    'total_estimated', true
  );
end
$$;

-- A page by offset, newest first. Same signature and result as before, plus `total_estimated`.
-- Deep offsets are skipped in the index (ids only) and only the page's own rows are read; near the
-- top (offset < 1,000) reading the rows straight away is cheaper.
create or replace function public.collection_list_runs(
  p_org_id uuid,
  p_limit integer,
  p_offset integer,
  p_status text default null
)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  counted bigint;
  page jsonb;
begin
  if p_status is null then
    select count(*) into counted
      from (select 1 from public.collection_runs where org_id = p_org_id limit 10001) capped;
    if p_offset < 1000 then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id
               order by created_at desc, id desc
               limit p_limit offset p_offset) r;
    else
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select id from public.collection_runs
               where org_id = p_org_id
               order by created_at desc, id desc
               limit p_limit offset p_offset) k
        join public.collection_runs r on r.id = k.id;
    end if;
  else
    select count(*) into counted
      from (select 1 from public.collection_runs
             where org_id = p_org_id and status = p_status limit 10001) capped;
    if p_offset < 1000 then
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select * from public.collection_runs
               where org_id = p_org_id and status = p_status
               order by created_at desc, id desc
               limit p_limit offset p_offset) r;
    else
      select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc) into page
        from (select id from public.collection_runs
               where org_id = p_org_id and status = p_status
               order by created_at desc, id desc
               limit p_limit offset p_offset) k
        join public.collection_runs r on r.id = k.id;
    end if;
  end if;
  return (case when counted <= 10000
               then jsonb_build_object('total', counted, 'total_estimated', false)
               else public.collection_runs_total(p_org_id, p_status, counted) end)
         || jsonb_build_object('runs', coalesce(page, '[]'));
end
$$;

-- A page of the runs after (older than) the run with this created_at and id, newest first: the
-- keyset behind the API's `cursor`. As fast at any depth as the first page.
create or replace function public.collection_list_runs_after(
  p_org_id uuid,
  p_limit integer,
  p_after_created_at timestamptz,
  p_after_id uuid,
  p_status text default null
)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  counted bigint;
  page jsonb;
begin
  if p_status is null then
    select (select count(*) from (select 1 from public.collection_runs
                                   where org_id = p_org_id limit 10001) capped),
           (select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc)
              from (select * from public.collection_runs
                     where org_id = p_org_id and (created_at, id) < (p_after_created_at, p_after_id)
                     order by created_at desc, id desc
                     limit p_limit) r)
      into counted, page;
  else
    select (select count(*) from (select 1 from public.collection_runs
                                   where org_id = p_org_id and status = p_status limit 10001) capped),
           (select jsonb_agg(to_jsonb(r) order by r.created_at desc, r.id desc)
              from (select * from public.collection_runs
                     where org_id = p_org_id and status = p_status
                       and (created_at, id) < (p_after_created_at, p_after_id)
                     order by created_at desc, id desc
                     limit p_limit) r)
      into counted, page;
  end if;
  return (case when counted <= 10000
               then jsonb_build_object('total', counted, 'total_estimated', false)
               else public.collection_runs_total(p_org_id, p_status, counted) end)
         || jsonb_build_object('runs', coalesce(page, '[]'));
end
$$;

drop function public.collection_count_runs(uuid, text);

revoke execute on function public.collection_runs_total(uuid, text, bigint) from public, anon, authenticated;
grant execute on function public.collection_runs_total(uuid, text, bigint) to service_role;
